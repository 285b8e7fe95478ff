"""`python -m lvr_cli.torchrun ARGS`: `torch.distributed.run` as `lvr` relaunches itself.

The same launcher, without its noise on the console: its own log lines and, when a rank
fails, its report and traceback. Each rank has already said why it failed in
one line and written its traceback to the run's log; this adds a line only for a rank that died
without a word (killed by a signal: out of memory, a segfault). `lvr --verbose` keeps it all.
"""

from __future__ import annotations

import logging
import os
import sys


def main() -> int:
    verbose = bool(os.environ.get("LVR_VERBOSE"))
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if not verbose:  # its "Sending process ... closing signal SIGTERM", "failed (exitcode: 1) local_rank: 0"
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun(sys.argv[1:])
    except ChildFailedError as e:
        if verbose:
            raise
        rank, failure = e.get_first_failure()
        if failure.exitcode < 0:
            print(f"error: rank {rank} died of {failure.signal_name()} (out of memory or a crash in native code; "
                  "lvr --verbose shows the launcher's report)", file=sys.stderr)
            return 1
        return failure.exitcode
    return 0


if __name__ == "__main__":
    sys.exit(main())
