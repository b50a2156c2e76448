"""Pinned, side-stream block swap (`--use_pinned_memory_for_block_swap`): its schedule and bookkeeping, checked on the
CPU with a stand-in for the CUDA streams that records every copy and wait."""

import pytest
import torch

from frame_pack import block_swap as bs
from tests.factory.dit import tiny_dit_config
from tests.test_dit import fp32_model, section_inputs


class Event:
    def __init__(self, log, name):
        self.log, self.name, self.waited = log, name, False


class StandInTransfers:
    """CPU stand-in for `CudaTransfers`: "device" copies and "pinned" copies are clones whose storage is tracked,
    side-stream events are objects the compute stream must wait on before a block uses what they cover."""

    def __init__(self):
        self.log = []
        self.pinned, self.uploaded = set(), {}  # data_ptr -> event of the upload
        self.side_events = []

    def pin(self, tensor):
        pinned = tensor.clone()
        self.pinned.add(pinned.data_ptr())
        return pinned

    def compute_event(self):
        self.log.append("compute_event")
        return Event(self.log, "compute")

    def side_event(self):
        event = Event(self.log, "side")
        for ptr, pending in self.uploaded.items():
            if pending is None:
                self.uploaded[ptr] = event
        self.log.append("side_event")
        return event

    def side_waits(self, event):
        assert event.name == "compute"
        self.log.append("side_waits")

    def compute_waits(self, event):
        event.waited = True
        self.log.append("compute_waits")

    def upload(self, host):
        assert host.data_ptr() in self.pinned, "uploads come from page-locked copies"
        on_device = host.clone()
        self.uploaded[on_device.data_ptr()] = None
        self.log.append("upload")
        return on_device


def pinned_swap(model, swap_double, swap_single, transfers, backward=False):
    return bs.BlockSwap(
        [
            bs.PinnedStackSwapper(model.transformer_blocks, swap_double, "cpu", backward, transfers),
            bs.PinnedStackSwapper(model.single_transformer_blocks, swap_single, "cpu", backward, transfers),
        ]
    )


def check_each_block_runs_on_waited_uploads(model, transfers, resident_limits):
    """Pre-hooks: every weight of a running block is a waited-for upload or a never-moved weight, and no more than
    `num - num_swap` blocks of its stack hold device copies."""
    runs = []

    def on_device(w):
        return w.data_ptr() not in transfers.pinned

    for stack, limit in zip((model.transformer_blocks, model.single_transformer_blocks), resident_limits):
        for i, block in enumerate(stack):

            def hook(module, args, stack=stack, i=i, limit=limit):
                for w in bs._weights(module):
                    assert on_device(w), f"block {i} runs on its host copy"
                    event = transfers.uploaded.get(w.data_ptr())
                    assert event is None or event.waited, f"block {i} runs before its upload was waited for"
                resident = sum(all(on_device(w) for w in bs._weights(b)) for b in stack)
                assert resident <= limit
                runs.append(i)

            block.register_forward_pre_hook(hook)
    return runs


def pinned_swap_model(num_layers: int, num_single_layers: int, swap_double: int, swap_single: int):
    """A frozen fp32 tiny DiT given pinned block swap on stand-in transfers, with its section inputs and the output
    it gave before the swap was attached: (model, inputs, expected output, transfers)."""
    model = fp32_model(tiny_dit_config(num_layers=num_layers, num_single_layers=num_single_layers))
    model.requires_grad_(False)
    kw = section_inputs(dtype=torch.float32)
    with torch.no_grad():
        expected = model(**kw)
    transfers = StandInTransfers()
    model.block_swap = pinned_swap(model, swap_double, swap_single, transfers)
    return model, kw, expected, transfers


def test_pinned_block_swap_forward_is_exact_and_waits_for_each_upload():
    model, kw, expected, transfers = pinned_swap_model(4, 5, 2, 3)
    runs = check_each_block_runs_on_waited_uploads(model, transfers, (4 - 2, 5 - 3))
    model.block_swap.move_model(model, "cpu")
    with torch.no_grad():
        got1, got2 = model(**kw), model(**kw)
    assert torch.equal(got1, expected) and torch.equal(got2, expected)
    assert runs == ([0, 1, 2, 3] + [0, 1, 2, 3, 4]) * 2
    # per forward: 2 + 3 swaps, each "compute event -> side waits -> uploads -> side event"
    assert transfers.log.count("side_waits") == 2 * (2 + 3)
    first = transfers.log.index("side_waits")
    assert transfers.log[first - 1] == "compute_event" and transfers.log[first + 1] == "upload"
    # host memory: one page-locked copy per weight of the blocks that move (first and last num_swap of each stack)
    moving = [model.transformer_blocks[i] for i in (0, 1, 2, 3)] + [
        model.single_transformer_blocks[i] for i in (0, 1, 2, 3, 4)
    ]
    assert len(transfers.pinned) == sum(len(bs._weights(b)) for b in moving)


def test_pinned_block_swap_backward_gives_the_same_gradients():
    config = tiny_dit_config(num_layers=4, num_single_layers=4)
    kw = section_inputs(dtype=torch.float32)
    grads = []
    for swap in (False, True):
        model = fp32_model(config).train().requires_grad_(False)
        if swap:
            transfers = StandInTransfers()
            model.block_swap = pinned_swap(model, 2, 2, transfers, backward=True)
            model.block_swap.move_model(model, "cpu")
        model.x_embedder.proj.weight.requires_grad_(True)
        model(**kw).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-8), n
    assert transfers.log.count("side_waits") > 2 * 2  # forward swaps plus the backward's


def test_pinned_block_swap_refuses_trainable_weights_and_needs_cuda():
    model = fp32_model(tiny_dit_config()).requires_grad_(False)
    model.transformer_blocks[0].attn.to_q.weight.requires_grad_(True)
    swap = pinned_swap(model, 1, 1, StandInTransfers())
    with pytest.raises(RuntimeError, match="frozen weights"):
        swap.before_forward()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            bs.BlockSwap.for_model(model, 2, torch.device("cpu"), use_pinned_memory=True)


def test_offloading_a_block_swapped_model_reuses_the_pinned_copies_and_it_comes_back_exact():
    model, kw, expected, transfers = pinned_swap_model(4, 4, 2, 2)
    model.move_to_device_except_swap_blocks("cpu")
    with torch.no_grad():
        model(**kw)
    pinned_before = len(transfers.pinned)
    model.offload_to_cpu()  # between generations: the DiT leaves the device before the VAE decodes
    for stack in model.block_swap.stacks:
        assert stack.pending == {}
        for i in stack.moving_blocks():
            assert all(w.data_ptr() in transfers.pinned for w in bs._weights(stack.blocks[i]))
    assert len(transfers.pinned) == pinned_before  # no second host copy
    model.move_to_device_except_swap_blocks("cpu")
    with torch.no_grad():
        assert torch.equal(model(**kw), expected)
