"""parse_log accepts the diskwriter's bench lines (FORMAT.md "Bench"): ``B`` results are
recorded, ``b`` trace ticks skipped, malformed bench lines still rejected in strict mode."""

import pytest

from emu.oracle.records import LogError, parse_log

HELLO = "S hello diskwriter run=1a2b3c4d version=3 region=2048 count=64\r\n"
B_LINE = ("B vd vq write seq sectors=8 count=3 ok=3 errors=0 ms=12 maxgap_ms=5 tsc_k=900 "
          "maxgap_tsc_k=400 tsc_back=0")


def test_oracle_bench_lines_recorded_strict() -> None:
    text = (HELLO + "W vd 1 2048 1 vq\r\nC vd 1\r\nb\r\nb\r\nb\r\n" + B_LINE + "\r\n"
            + "B ide dma read rand sectors=128 count=1 ok=0 errors=1 ms=10000 maxgap_ms=10000 "
              "tsc_k=1 maxgap_tsc_k=1 tsc_back=2\r\nS quit seq=1\r\n")
    log = parse_log(text, strict=True)
    assert log.quit and log.writes[1].completed == 2
    assert len(log.bench) == 2
    first, second = log.bench
    assert (first["disk"], first["method"], first["dir"], first["pattern"]) == ("vd", "vq", "write", "seq")
    assert first["sectors"] == 8 and first["ok"] == 3 and first["maxgap_tsc_k"] == 400
    assert (second["disk"], second["method"], second["errors"], second["tsc_back"]) == ("ide", "dma", 1, 2)


@pytest.mark.parametrize("bad", [
    "B vd vq write seq sectors=x",            # field not a number
    "B vd vq write seq sectors",              # not key=value
    "B nvme vq write seq sectors=1",          # unknown disk
    "B vd scsi write seq sectors=1",          # unknown method
    "bb",                                     # not a trace line
])
def test_oracle_bench_malformed_rejected(bad: str) -> None:
    with pytest.raises(LogError):
        parse_log(HELLO + bad + "\n", strict=True)
    # lenient mode skips unknown lines but a recognised B line with bad fields is still an error
    if bad.startswith(("B vd vq", )):
        with pytest.raises(LogError):
            parse_log(HELLO + bad + "\n", strict=False)
    else:
        assert parse_log(HELLO + bad + "\n", strict=False).bench == []
