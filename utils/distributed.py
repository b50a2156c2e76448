"""Several processes started by `accelerate launch` or `torchrun`: one process group, work split by rank, results
gathered on every rank.

The launchers set WORLD_SIZE, RANK and LOCAL_RANK; without them there is one process and nothing here starts a
process group. GPUs join over nccl, CPU-only machines over gloo. Work is split round-robin: item i of a list goes to
rank i mod N, so each rank's share is known from the list alone and shares differ in length by at most one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Generic, TypeVar

import torch

from utils.cli import EXIT_BAD_INPUT, UserError, report_error
from utils.device import resolve_device

T = TypeVar("T")
logger = logging.getLogger(__name__)


def launched_processes() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank among the launched ones (0 without a launcher); known before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def process_group_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def cpu_only_group() -> bool:
    """accelerate joins several processes without CUDA only when told to run on the CPU."""
    return launched_processes() > 1 and not torch.cuda.is_available()


def share(items: Sequence[T], rank: int, count: int) -> list[T]:
    """Rank `rank`'s items of `count` ranks: items rank, rank + count, rank + 2·count, ..."""
    return list(items[rank::count])


class ShareFailed(Exception):
    """Some process's share of the work stopped with an error; the message names each such process and its error."""


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What one rank's work returned, or the message of the error it stopped with."""

    rank: int
    result: T | None
    error: str | None


def failure_summary(outcomes: Sequence[Outcome]) -> str | None:
    """The error of a single process, or one line naming every failed process and its error; None when all
    succeeded."""
    failed = [o for o in outcomes if o.error is not None]
    if not failed:
        return None
    if len(outcomes) == 1:
        return failed[0].error
    return "; ".join(f"process {o.rank} of {len(outcomes)} failed: {o.error}" for o in failed)


@dataclass(frozen=True)
class Processes:
    """This process's place among the launched ones. With one process every method is a cheap no-op."""

    rank: int = 0
    count: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.count > 1

    def share(self, items: Sequence[T]) -> list[T]:
        return share(items, self.rank, self.count)

    def gather(self, values: list[T]) -> list[T]:
        """Every rank's `values` concatenated in rank order, returned on every rank."""
        if not self.several:
            return list(values)
        from accelerate.utils import gather_object

        return gather_object(list(values))

    def share_of_range(self, first: int, count: int) -> list[int]:
        """This rank's indices 0..count-1 of a list whose items are numbered from `first` in a longer sequence (the
        media files of several datasets), so the split stays balanced across the datasets."""
        return [index for index in range(count) if (first + index) % self.count == self.rank]

    def run_share(self, work: Callable[[], T], errors: tuple[type[Exception], ...] = (UserError,)) -> list[T]:
        """Run this rank's `work` and return every rank's result in rank order. The ranks meet in one collective
        call whether their work failed or not, so a failing rank never leaves the others waiting; if any failed
        (with one of `errors`), every rank raises ShareFailed."""
        try:
            outcome = Outcome(self.rank, work(), None)
        except errors as e:
            outcome = Outcome(self.rank, None, str(e))
        outcomes = self.gather([outcome])
        failure = failure_summary(outcomes)
        if failure is not None:
            raise ShareFailed(failure)
        return [o.result for o in outcomes]

    def wait_for_everyone(self) -> None:
        if self.several:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def device(self, requested: str | None) -> torch.device:
        """The device of this process: among several, each takes its own GPU (cuda:LOCAL_RANK) unless `--device`
        names one (`cuda:1`, `cpu`); a single process resolves `--device` as usual."""
        if self.several and requested in (None, "cuda") and torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return resolve_device(requested)


SINGLE_PROCESS = Processes()


def start_processes(timeout: timedelta | None = None) -> Processes:
    """Join the launcher's process group (once per process; accelerate keeps it) and say where this process stands."""
    if launched_processes() == 1:
        return SINGLE_PROCESS
    from accelerate import PartialState

    kwargs = {"backend": process_group_backend()}
    if timeout is not None:
        kwargs["timeout"] = timeout
    state = PartialState(cpu=cpu_only_group(), **kwargs)
    return Processes(state.process_index, state.num_processes, state.local_process_index)


def run_in_processes(work: Callable[[Processes], None]) -> int:
    """Exit status of a script's `work` run in this process: 0, or EXIT_BAD_INPUT after a user error is printed as
    one `error:` line. An error of one process's share is reported once, by the main process, for every process."""
    processes = start_processes()
    try:
        work(processes)
    except (UserError, ShareFailed) as e:
        if processes.is_main or not isinstance(e, ShareFailed):
            report_error(e)
        return EXIT_BAD_INPUT
    return 0
