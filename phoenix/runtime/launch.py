"""``phoenix torchrun``: torchrun, with a Ctrl-C that stops a run cleanly.

torchrun handles SIGINT itself: it sends SIGINT to its workers, kills them with SIGKILL
30 s later, and exits 1 with a ``SignalException`` traceback, whatever the workers did.
Workers of ``phoenix.train`` stop cleanly on SIGINT (finish the step, save a checkpoint,
exit 0; phoenix.runtime.preemption), which may take longer than 30 s for a large model.

``phoenix torchrun ARGS`` is ``torchrun ARGS`` with SIGINT left out of the signals torchrun
handles (``--signals-to-handle``; SIGTERM, SIGHUP and SIGQUIT are still its own): the
launcher forwards a Ctrl-C to the workers and torchrun keeps waiting for them, so the job
ends when they do, with their exit status (0 after a clean stop). A second Ctrl-C is
forwarded too (the workers exit at once, without saving) and ends the launcher with exit
status 130, after torchrun has stopped what is left. A failed job ends with one line
naming the first rank that failed and the exit status of that rank (torchrun: a
``ChildFailedError`` traceback and status 1).
"""

from __future__ import annotations

import signal
import sys

_TORCHRUN_SIGNALS = "SIGTERM,SIGHUP,SIGQUIT"


def _without_sigint(argv: list[str]) -> list[str]:
    """``argv`` with SIGINT removed from ``--signals-to-handle`` (added when absent)."""
    out, i, given = [], 0, False
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("--signals-to-handle", "--signals_to_handle"):
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            value = ",".join(s for s in value.split(",") if s.strip() != "SIGINT")
            out.append(f"--signals-to-handle={value}")
            given = True
        elif arg in ("-m", "--module") or not arg.startswith("-"):
            out += argv[i:]  # the training script and its own arguments: not ours
            break
        else:
            out.append(arg)
        i += 1
    return out if given else [f"--signals-to-handle={_TORCHRUN_SIGNALS}", *out]


class _ForwardInterrupt:
    """SIGINT handler of the launcher: forward to the workers; the second one ends it."""

    def __init__(self):
        self.count = 0

    def __call__(self, signum, frame) -> None:
        import psutil  # imported by main(): a second Ctrl-C may come in the middle of it

        self.count += 1
        workers = psutil.Process().children()
        for worker in workers:
            try:
                worker.send_signal(signal.SIGINT)
            except psutil.Error:
                pass
        if self.count > 1 or not workers:
            print("phoenix torchrun: interrupted again: the workers exit without saving"
                  if workers else "phoenix torchrun: interrupted before the workers started",
                  file=sys.stderr, flush=True)
            raise SystemExit(130)  # torchrun's agent stops the rest on its way out


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.run import main as torchrun

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nusage: phoenix torchrun [torchrun options] -m phoenix.train "
              "RECIPE.yaml [overrides ...]   (torchrun --help lists its options)")
        return 0
    import psutil  # noqa: F401  (for the handler)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    interrupt = _ForwardInterrupt()
    signal.signal(signal.SIGINT, interrupt)
    try:
        torchrun(_without_sigint(argv))
    except ChildFailedError as e:  # the worker said why (one line); no launcher traceback
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if interrupt.count and code in (130, -signal.SIGINT):
            return 130  # Ctrl-C before training began: the workers said so
        how = f"exit code {code}" if code >= 0 else f"signal {-code}"
        print(f"phoenix torchrun: the job failed (rank {rank} ended first, with {how}; "
              f"the reason is above)", file=sys.stderr, flush=True)
        return code if 0 < code < 256 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
