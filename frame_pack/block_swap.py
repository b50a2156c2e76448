"""Block swap (`--blocks_to_swap`): keep some transformer blocks' weights on the CPU and stream them in.

Follows musubi-tuner's schedule. For a stack of `num` blocks with `swap` swapped: before a forward, blocks
[0, num-swap) hold their weights on the device and the rest on the CPU. After block i (i < swap) finishes, block i's
weights go out and block num-swap+i's weights come in, on a worker thread, so the transfer overlaps compute; a block
waits for its own pending transfer before it runs. Backward (training) mirrors this in reverse order.

Only `.weight` tensors move; biases and buffers (e.g. fp8 `scale_weight`) stay on the device. The double and single
stacks swap separately: `--blocks_to_swap n` swaps n//2 double blocks and (n - n//2)·2 + 1 single blocks.

`--use_pinned_memory_for_block_swap` (CUDA) keeps the host copy of every block that moves in page-locked memory and
queues the transfers on a side stream instead of a worker thread: when block i finishes, the side stream waits for
it on the GPU, releases its device copy and uploads the incoming block, so that copy runs while the next blocks
compute; a block's compute waits (on the GPU, not the host) only for its own upload. The host copy is the one
authoritative copy: swapped weights are frozen (inference, or a LoRA's base model), so nothing is copied back.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

MAX_BLOCKS_TO_SWAP_INFERENCE = 38
MAX_BLOCKS_TO_SWAP_TRAINING = 36


def split_blocks_to_swap(blocks_to_swap: int) -> tuple[int, int]:
    """`--blocks_to_swap n` -> (double blocks swapped, single blocks swapped)."""
    double = blocks_to_swap // 2
    return double, (blocks_to_swap - double) * 2 + 1


def check_blocks_to_swap(blocks_to_swap: int, num_double: int, num_single: int, training: bool) -> None:
    """Refuse counts the stacks cannot hold: the full model allows 38 at inference and 36 in training.

    Each stack must keep one block resident at inference, two in training (the backward schedule fetches block
    i-1 while block i runs).
    """
    double, single = split_blocks_to_swap(blocks_to_swap)
    keep = 2 if training else 1
    if blocks_to_swap < 0 or double > num_double - keep or single > num_single - keep:
        limit = MAX_BLOCKS_TO_SWAP_TRAINING if training else MAX_BLOCKS_TO_SWAP_INFERENCE
        raise ValueError(
            f"--blocks_to_swap {blocks_to_swap}: too many for {num_double} double and {num_single} single blocks "
            f"{'in training' if training else 'at inference'} (the full FramePack model allows at most {limit})"
        )


def _weights(block: nn.Module) -> list[nn.Parameter]:
    return [m.weight for m in block.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]


class StackSwapper:
    """Swaps block weights of one ModuleList between `device` and the CPU."""

    offload_device = torch.device("cpu")

    def __init__(self, blocks: nn.ModuleList, num_swap: int, device: torch.device, supports_backward: bool):
        self.blocks, self.num, self.num_swap = blocks, len(blocks), num_swap
        self.device = torch.device(device)
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.pending: dict[int, Future] = {}
        if supports_backward:
            for i, block in enumerate(blocks):
                block.register_full_backward_hook(self._backward_hook(i))

    # Weight movement; overridden in tests to make a missed transfer visible on a CPU-only machine.
    def to_device(self, block: nn.Module) -> None:
        for w in _weights(block):
            w.data = w.data.to(self.device, non_blocking=True)

    def to_offload(self, block: nn.Module) -> None:
        for w in _weights(block):
            w.data = w.data.to(self.offload_device, non_blocking=True)

    def _swap(self, out_idx: int, in_idx: int, ready: torch.cuda.Event | None) -> None:
        if ready is not None:
            ready.synchronize()  # the outgoing block's kernels have finished
        self.to_offload(self.blocks[out_idx])
        self.to_device(self.blocks[in_idx])
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _submit(self, out_idx: int, in_idx: int) -> None:
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        self.pending[in_idx] = self.executor.submit(self._swap, out_idx, in_idx, ready)

    def wait_for(self, idx: int) -> None:
        future = self.pending.pop(idx, None)
        if future is not None:
            future.result()

    def before_forward(self) -> None:
        for idx in list(self.pending):
            self.wait_for(idx)
        for i, block in enumerate(self.blocks):
            (self.to_device if i < self.num - self.num_swap else self.to_offload)(block)

    def after_block(self, idx: int) -> None:
        if idx < self.num_swap:
            self._submit(idx, self.num - self.num_swap + idx)

    def _backward_hook(self, idx: int):
        done_before = self.num - idx - 1  # blocks whose backward already ran when block idx finishes

        def hook(module, grad_input, grad_output):
            if 0 < done_before <= self.num_swap:
                self._submit(self.num - done_before, self.num_swap - done_before)
            if 0 < idx <= self.num_swap:
                self.wait_for(idx - 1)

        return hook


class CudaTransfers:
    """Page-locked host memory and a side stream on one CUDA device (created only when pinned block swap is on)."""

    def __init__(self, device: torch.device):
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError("--use_pinned_memory_for_block_swap needs a CUDA device")
        self.device = device
        self.side = torch.cuda.Stream(device)
        self.compute = torch.cuda.current_stream(device)

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to("cpu").pin_memory()

    def compute_event(self) -> torch.cuda.Event:
        """An event after the work queued so far on the compute stream."""
        event = torch.cuda.Event()
        event.record(self.compute)
        return event

    def side_event(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(self.side)
        return event

    def side_waits(self, event: torch.cuda.Event) -> None:
        self.side.wait_event(event)

    def compute_waits(self, event: torch.cuda.Event) -> None:
        self.compute.wait_event(event)

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """Asynchronous copy to the device on the side stream; the copy is then used by the compute stream."""
        with torch.cuda.stream(self.side):
            on_device = host.to(self.device, non_blocking=True)
        on_device.record_stream(self.compute)  # the allocator reuses its memory only after the compute using it
        return on_device


class PinnedStackSwapper(StackSwapper):
    """The same schedule as `StackSwapper`, with transfers from page-locked host copies queued on a side stream.

    `transfers` provides the streams, events and copies (`CudaTransfers`; tests pass a CPU stand-in).
    """

    def __init__(self, blocks, num_swap, device, supports_backward, transfers):
        super().__init__(blocks, num_swap, device, supports_backward)
        self.transfers = transfers
        self.host: dict[int, torch.Tensor] = {}  # id(weight) -> its page-locked host copy

    def moving_blocks(self) -> list[int]:
        """Blocks the schedule moves: the first and last `num_swap` of the stack."""
        return [i for i in range(self.num) if i < self.num_swap or i >= self.num - self.num_swap]

    def _pin(self) -> None:
        for i in self.moving_blocks():
            for w in _weights(self.blocks[i]):
                if w.requires_grad:
                    raise RuntimeError("pinned block swap moves frozen weights only; freeze the DiT first")
                self.host[id(w)] = self.transfers.pin(w.data)
                if w.device.type == "cpu":
                    w.data = self.host[id(w)]

    def to_device(self, block: nn.Module) -> None:
        for w in _weights(block):
            host = self.host.get(id(w))
            if host is None:  # a block that never moves
                w.data = w.data.to(self.device)
            elif w.data_ptr() == host.data_ptr() or w.device != self.device:
                w.data = self.transfers.upload(host)

    def to_offload(self, block: nn.Module) -> None:
        for w in _weights(block):
            w.data = self.host[id(w)]  # the device copy is released; the allocator waits for the work using it

    def _submit(self, out_idx: int, in_idx: int) -> None:
        self.transfers.side_waits(self.transfers.compute_event())  # block out_idx has finished on the GPU
        self.to_offload(self.blocks[out_idx])
        self.to_device(self.blocks[in_idx])
        self.pending[in_idx] = self.transfers.side_event()

    def wait_for(self, idx: int) -> None:
        event = self.pending.pop(idx, None)
        if event is not None:
            self.transfers.compute_waits(event)

    def before_forward(self) -> None:
        if not self.host:
            self._pin()
        super().before_forward()
        self.transfers.compute_waits(self.transfers.side_event())


class BlockSwap:
    """Block swap over the double and single stacks of a packed DiT, addressed by one running block index."""

    def __init__(self, stacks: list[StackSwapper]):
        self.stacks = stacks

    @classmethod
    def for_model(
        cls, model, blocks_to_swap: int, device, supports_backward: bool = False, use_pinned_memory: bool = False
    ) -> BlockSwap:
        double, single = split_blocks_to_swap(blocks_to_swap)
        device = torch.device(device)
        lists = ((model.transformer_blocks, double), (model.single_transformer_blocks, single))
        if use_pinned_memory:
            transfers = CudaTransfers(device)
            stacks = [PinnedStackSwapper(b, n, device, supports_backward, transfers) for b, n in lists]
        else:
            stacks = [StackSwapper(b, n, device, supports_backward) for b, n in lists]
        how = "pinned host memory, side stream" if use_pinned_memory else "worker thread"
        logger.info(f"block swap: {double} double and {single} single blocks stream their weights from the CPU ({how})")
        return cls(stacks)

    def _locate(self, idx: int) -> tuple[StackSwapper, int]:
        first = self.stacks[0]
        return (first, idx) if idx < first.num else (self.stacks[1], idx - first.num)

    def move_model(self, model: nn.Module, device) -> None:
        """Move `model` to `device` without ever holding the swapped blocks' weights there."""
        swapped = set()
        for stack in self.stacks:
            for block in stack.blocks[stack.num - stack.num_swap :]:
                swapped.update(id(w) for w in _weights(block))
        for param in model.parameters():
            if id(param) not in swapped:
                param.data = param.data.to(device)
        for buf_owner in model.modules():
            for name, buf in buf_owner.named_buffers(recurse=False):
                buf_owner._buffers[name] = buf.to(device)
        self.before_forward()

    def before_forward(self) -> None:
        for stack in self.stacks:
            stack.before_forward()

    def offload_model(self, model: nn.Module) -> None:
        """Everything to the CPU once the transfers in flight have finished (pinned host copies are reused)."""
        for stack in self.stacks:
            for idx in list(stack.pending):
                stack.wait_for(idx)
            if stack.device.type == "cuda":
                torch.cuda.synchronize(stack.device)
            for block in stack.blocks:
                stack.to_offload(block)
        model.to("cpu")

    def wait_for(self, idx: int) -> None:
        stack, i = self._locate(idx)
        stack.wait_for(i)

    def after_block(self, idx: int) -> None:
        stack, i = self._locate(idx)
        stack.after_block(i)
