"""Protocol and simple format drivers: ``file`` (POSIX), ``raw`` (offset/size window), ``blkdebug``."""
