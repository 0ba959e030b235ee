"""Tests of chapter 06 (qlora_lab.paging: device_pool, pager, paged_adamw, simulated_run): the paged AdamW equals torch.optim.AdamW bit for
bit at any device budget; pages move least recently used first; the counters
count exactly; a memory spike fails without paging and passes with it."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from qlora_lab.paging.device_pool import DeviceOutOfMemoryError, DevicePool, format_size
from qlora_lab.paging.paged_adamw import PagedAdamW
from qlora_lab.paging.simulated_run import ActivationMeter, hold_model, parameter_bytes, training_steps
from qlora_lab.paging.state_bytes import optimizer_state_bytes


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 16), torch.nn.LayerNorm(16),
        torch.nn.Linear(16, 16),  # never used in forward: its parameters get no gradient
    )


def _groups(net: torch.nn.Module) -> list[dict]:
    """Three groups: defaults, another lr and weight decay, no weight decay."""
    return [
        {"params": list(net[0].parameters())},
        {"params": list(net[2].parameters()) + list(net[4].parameters()), "lr": 3e-3, "weight_decay": 0.1},
        {"params": list(net[3].parameters()), "weight_decay": 0.0},
    ]


def _loss(net: torch.nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(32, 24, generator=gen)
    y = torch.randn(32, 16, generator=gen)
    return ((net[3](net[2](net[1](net[0](x)))) - y) ** 2).mean()


def _train(net: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        opt.zero_grad()
        loss = _loss(net, step)
        loss.backward()
        if step % 3 == 1:  # this step the LayerNorm gets no gradient: skipped, its step count lags
            net[3].weight.grad = None
            net[3].bias.grad = None
        opt.step()
        losses.append(loss.item())
    return losses


def _assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def _assert_same_state_dict(sd_ref: dict, sd: dict) -> None:
    # "foreach" differs only when the reference was built with an explicit foreach=False
    def groups(state_dict):
        return [{k: v for k, v in g.items() if k != "foreach"} for g in state_dict["param_groups"]]

    assert groups(sd) == groups(sd_ref)
    assert sd["state"].keys() == sd_ref["state"].keys()
    for index, ref_values in sd_ref["state"].items():
        assert sd["state"][index].keys() == ref_values.keys()
        for key, ref in ref_values.items():
            got = sd["state"][index][key]
            assert got.dtype == ref.dtype and got.shape == ref.shape, (index, key)
            assert torch.equal(got, ref), (index, key)


def _largest_state_bytes(opt: PagedAdamW) -> int:
    return max(opt.state_pages(p) for g in opt.param_groups for p in g["params"]) * opt.page_bytes


# --------------------------------------------------------------------------- AdamW equivalence


@pytest.mark.parametrize("budget", ["unlimited", "generous", "tight"])
def test_matches_torch_adamw_bit_for_bit(budget):
    ref_net, net = _net(), _net()
    ref = torch.optim.AdamW(_groups(ref_net), lr=1e-2, foreach=False)
    page_bytes = 256
    probe = PagedAdamW(_groups(_net()), page_bytes=page_bytes)
    need = _largest_state_bytes(probe)
    total = sum(probe.state_pages(p) for g in probe.param_groups for p in g["params"]) * page_bytes
    assert need == 30 * 256  # the first Linear's weight: 960 floats, 15 pages per moment
    budget_bytes = {"unlimited": None, "generous": 2 * total, "tight": need}[budget]
    opt = PagedAdamW(_groups(net), lr=1e-2, page_bytes=page_bytes, device_budget_bytes=budget_bytes)

    ref_losses = _train(ref_net, ref, range(40))
    losses = _train(net, opt, range(40))

    assert losses == ref_losses
    _assert_same_params(ref_net, net)
    _assert_same_state_dict(ref.state_dict(), opt.state_dict())
    assert net[4].weight not in opt.state  # never had a gradient: no state, as in torch
    if budget == "tight":  # every parameter's pages evict someone else's, every step
        assert opt.counters.evictions > 40 * 6 and opt.counters.prefetches > 40 * 6
        assert opt.pool.peak == need
    else:
        assert opt.counters.bytes_moved == 0
        assert opt.pool.used == sum(opt.state_pages(p) for p in opt.state) * page_bytes


def test_matches_torch_adamw_bfloat16_and_fault_mode():
    torch.manual_seed(0)
    ref_w = torch.nn.Parameter(torch.randn(300, dtype=torch.bfloat16))
    w = torch.nn.Parameter(ref_w.detach().clone())
    other = torch.nn.Parameter(torch.randn(300, dtype=torch.bfloat16))
    ref = torch.optim.AdamW([ref_w, torch.nn.Parameter(other.detach().clone())], lr=1e-2)
    opt = PagedAdamW([w, other], lr=1e-2, page_bytes=128, device_budget_bytes=10 * 128, prefetch=False)
    for step in range(20):
        gen = torch.Generator().manual_seed(step)
        grad = torch.randn(300, generator=gen).to(torch.bfloat16)
        for p in (ref_w, w, ref.param_groups[0]["params"][1], other):
            p.grad = grad.clone()
        ref.step()
        opt.step()
    assert torch.equal(w, ref_w)
    assert torch.equal(other, ref.param_groups[0]["params"][1])
    # without prefetch, the same pages come in as page faults
    assert opt.counters.prefetches == 0 and opt.counters.faults == opt.counters.pages_in > 0


def test_non_contiguous_parameter_and_reload():
    torch.manual_seed(0)
    ref_w = torch.nn.Parameter(torch.randn(30, 20).t())  # strides (1, 20): pages follow memory order
    w = torch.nn.Parameter(torch.empty_like(ref_w).copy_(ref_w.detach()))
    assert w.stride() == ref_w.stride() == (1, 20)
    ref = torch.optim.AdamW([ref_w], lr=1e-2, weight_decay=0.05)
    opt = PagedAdamW([w], lr=1e-2, weight_decay=0.05, page_bytes=512, device_budget_bytes=10 * 512)
    for step in range(12):
        grad = torch.randn(30, 20, generator=torch.Generator().manual_seed(step)).t()
        ref_w.grad, w.grad = grad.clone(), grad.clone()
        ref.step()
        opt.step()
        if step == 5:
            opt.load_state_dict(opt.state_dict())  # state back from host pages, in w's memory order
    assert torch.equal(w, ref_w)
    _assert_same_state_dict(ref.state_dict(), opt.state_dict())


# --------------------------------------------------------------------------- LRU and counters


def _three_params(numel: int) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(numel)) for _ in range(3)]


def _give_grads(params, which=None) -> None:
    for i, p in enumerate(params):
        p.grad = torch.ones_like(p) if which is None or i in which else None


def test_eviction_is_least_recently_used_first():
    # 3 parameters of 16 floats, 64-byte pages: one page per state tensor, 6 pages in all
    params = _three_params(16)
    pool = DevicePool(8 * 64, record_events=True)
    opt = PagedAdamW(params, page_bytes=64, pool=pool)
    _give_grads(params)
    opt.step()
    assert opt.pager.lru_order() == ["p0.exp_avg[0]", "p0.exp_avg_sq[0]", "p1.exp_avg[0]",
                                     "p1.exp_avg_sq[0]", "p2.exp_avg[0]", "p2.exp_avg_sq[0]"]
    _give_grads(params, which={0})  # only p0 is updated: it becomes the most recently used
    opt.step()
    assert opt.pager.lru_order()[:2] == ["p1.exp_avg[0]", "p1.exp_avg_sq[0]"]

    pool.events.clear()
    spike = pool.allocate(4 * 64, owner="activations")  # 2 pages free, 2 must be evicted: p1's
    assert [e.label for e in pool.events] == ["evict p1.exp_avg[0]", "evict p1.exp_avg_sq[0]", ""]
    assert [(e.kind, e.owner) for e in pool.events] == [("free", "optimizer")] * 2 + [("allocate", "activations")]
    more = pool.allocate(64, owner="activations")  # next least recently used: p2's first page
    assert pool.events[-2].label == "evict p2.exp_avg[0]"
    assert opt.pager.lru_order() == ["p2.exp_avg_sq[0]", "p0.exp_avg[0]", "p0.exp_avg_sq[0]"]
    assert pool.usage() == {"optimizer": 3 * 64, "activations": 5 * 64}

    pool.free(spike)
    pool.free(more)
    pool.events.clear()
    _give_grads(params, which={1})
    opt.step()  # p1's pages come back before its update, into the freed room
    assert [e.label for e in pool.events] == ["prefetch p1.exp_avg[0]", "prefetch p1.exp_avg_sq[0]"]


def test_counters_of_a_small_scenario():
    # 3 parameters of 1024 floats, 4 KiB pages: 2 pages of state each; the device holds 4 pages
    params = _three_params(1024)
    opt = PagedAdamW(params, page_bytes=4096, device_budget_bytes=4 * 4096)
    _give_grads(params)
    opt.step()  # p0, p1 fill the device; p2's two new pages evict p0's two
    assert opt.counters.as_dict() == {
        "pages_in": 0, "pages_out": 2, "bytes_in": 0, "bytes_out": 8192, "prefetches": 0,
        "faults": 0, "evictions": 2, "pages_created": 6, "bytes_moved": 8192,
    }
    opt.step()  # cyclic access: each parameter's prefetch evicts the next one's pages
    assert opt.counters.as_dict() == {
        "pages_in": 6, "pages_out": 8, "bytes_in": 24576, "bytes_out": 32768, "prefetches": 6,
        "faults": 0, "evictions": 8, "pages_created": 6, "bytes_moved": 57344,
    }
    assert (opt.pool.used, opt.pool.peak, opt.pool.capacity) == (16384, 16384, 16384)
    assert opt.pager.lru_order() == ["p1.exp_avg[0]", "p1.exp_avg_sq[0]", "p2.exp_avg[0]", "p2.exp_avg_sq[0]"]


# --------------------------------------------------------------------------- the memory spike


def _spike_run(paging: bool):
    """A shared device of 12 KiB: optimizer state takes 8 KiB (8 pages of 1 KiB),
    ordinary batches need 2 KiB of activations, step 3's long batch needs 9 KiB."""
    torch.manual_seed(0)
    net = torch.nn.Linear(32, 32, bias=False)  # 1024 floats: 4 pages per moment
    pool = DevicePool(12 * 1024)
    opt = PagedAdamW(net.parameters(), lr=1e-2, page_bytes=1024, pool=pool, paging=paging)
    losses = []
    for step in range(6):
        activation_bytes = 9 * 1024 if step == 3 else 2 * 1024
        opt.zero_grad()
        with pool.hold(activation_bytes, "activations"):
            loss = _loss_linear(net, step)
            loss.backward()
        opt.step()
        losses.append(loss.item())
    return net, opt, losses


def _loss_linear(net: torch.nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    return ((net(torch.randn(8, 32, generator=gen)) - torch.randn(8, 32, generator=gen)) ** 2).mean()


def test_spike_fails_without_paging():
    with pytest.raises(DeviceOutOfMemoryError) as info:
        _spike_run(paging=False)
    err = info.value
    assert isinstance(err, torch.OutOfMemoryError)  # caught by `except torch.OutOfMemoryError`
    assert (err.requested, err.capacity, err.free) == (9216, 12288, 4096)
    assert err.usage == {"optimizer": 8192}
    message = str(err)
    assert message.startswith("Simulated device out of memory. Tried to allocate 9.00 KiB for 'activations'. "
                              "Device 'sim-gpu' has a total capacity of 12.00 KiB of which 4.00 KiB is free.")
    assert "optimizer 8.00 KiB" in message and "no pager is registered" in message


def test_spike_passes_with_paging_and_training_is_unchanged():
    net, opt, losses = _spike_run(paging=True)
    torch.manual_seed(0)
    ref_net = torch.nn.Linear(32, 32, bias=False)
    ref = torch.optim.AdamW(ref_net.parameters(), lr=1e-2)
    ref_losses = []
    for step in range(6):
        ref.zero_grad()
        loss = _loss_linear(ref_net, step)
        loss.backward()
        ref.step()
        ref_losses.append(loss.item())
    assert losses == ref_losses
    _assert_same_params(ref_net, net)
    # the spike evicted 5 pages (9 KiB needed, 4 KiB free); they came back for the update
    assert opt.counters.evictions == 5 and opt.counters.prefetches == 5
    assert opt.pool.peak == 12 * 1024 and opt.pool.usage() == {"optimizer": 8192}


def test_allocation_larger_than_the_device_evicts_nothing():
    params = _three_params(16)
    opt = PagedAdamW(params, page_bytes=64, device_budget_bytes=6 * 64)
    _give_grads(params)
    opt.step()
    with pytest.raises(DeviceOutOfMemoryError, match=r"Tried to allocate 448 bytes .* capacity of 384 bytes"):
        opt.pool.allocate(7 * 64)
    assert opt.counters.evictions == 0  # hopeless requests do not flush the state for nothing
    assert opt.pool.used == 6 * 64


def test_paging_off_state_that_does_not_fit_fails_cleanly():
    params = _three_params(16)
    pool = DevicePool(5 * 64)
    opt = PagedAdamW(params, page_bytes=64, pool=pool, paging=False)
    _give_grads(params)
    with pytest.raises(DeviceOutOfMemoryError, match="Tried to allocate 64 bytes for 'optimizer'"):
        opt.step()
    assert pool.used == 4 * 64  # p0 and p1 got state; p2's half-made state was given back
    assert params[2] not in opt.state or len(opt.state[params[2]]) == 0


# --------------------------------------------------------------------------- checkpoints


def test_state_dict_round_trip_with_torch_adamw():
    ref_net, net = _net(), _net()
    ref = torch.optim.AdamW(_groups(ref_net), lr=1e-2)
    opt = PagedAdamW(_groups(net), lr=1e-2, page_bytes=256, device_budget_bytes=32 * 256)
    _train(ref_net, ref, range(7))
    _train(net, opt, range(7))
    checkpoint = opt.state_dict()
    _assert_same_state_dict(ref.state_dict(), checkpoint)

    # PagedAdamW -> torch AdamW, and torch AdamW -> a fresh PagedAdamW with a tight budget
    torch_net, paged_net = _net(), _net()
    torch_net.load_state_dict(net.state_dict())
    paged_net.load_state_dict(ref_net.state_dict())
    loaded_torch = torch.optim.AdamW(_groups(torch_net))
    loaded_torch.load_state_dict(copy.deepcopy(checkpoint))  # torch keeps the dict's tensors
    loaded_paged = PagedAdamW(_groups(paged_net), page_bytes=256, device_budget_bytes=30 * 256)
    loaded_paged.load_state_dict(ref.state_dict())
    assert loaded_paged.pool.used == 0  # loaded pages start in host memory
    _assert_same_state_dict(ref.state_dict(), loaded_paged.state_dict())

    # reloading into the optimizer itself frees the old pages first
    opt.load_state_dict(checkpoint)
    assert opt.pool.used == 0

    for continued_net, continued in ((ref_net, ref), (net, opt), (torch_net, loaded_torch),
                                     (paged_net, loaded_paged)):
        _train(continued_net, continued, range(7, 20))
    for other in (net, torch_net, paged_net):
        _assert_same_params(ref_net, other)
    _assert_same_state_dict(ref.state_dict(), loaded_paged.state_dict())


def test_load_state_dict_rejects_amsgrad():
    net = _net()
    ref = torch.optim.AdamW(net.parameters(), amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad=True"):
        PagedAdamW(net.parameters()).load_state_dict(ref.state_dict())


# --------------------------------------------------------------------------- bad input


def _torch_message(**kwargs) -> str:
    with pytest.raises(ValueError) as info:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)
    return str(info.value)


@pytest.mark.parametrize("kwargs", [{"lr": -1.0}, {"eps": -1e-8}, {"betas": (1.0, 0.999)},
                                    {"betas": (0.9, -0.1)}, {"weight_decay": -0.1}])
def test_hyperparameters_validated_like_torch(kwargs):
    with pytest.raises(ValueError) as info:
        PagedAdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)
    assert str(info.value) == _torch_message(**kwargs)


def test_bad_page_and_budget_sizes():
    p = [torch.nn.Parameter(torch.zeros(100))]
    with pytest.raises(ValueError, match="page_bytes must be a positive number of bytes, got 0"):
        PagedAdamW(p, page_bytes=0)
    with pytest.raises(ValueError, match="page_bytes must be a positive number of bytes, got -4096"):
        PagedAdamW(p, page_bytes=-4096)
    with pytest.raises(TypeError, match="page_bytes must be an int"):
        PagedAdamW(p, page_bytes=4096.0)
    with pytest.raises(ValueError, match="not a multiple of the 4-byte elements"):
        PagedAdamW(p, page_bytes=4094)
    with pytest.raises(ValueError, match=r"device budget \(1000 bytes\) is smaller than one page \(page_bytes=4096\)"):
        PagedAdamW(p, device_budget_bytes=1000)
    with pytest.raises(ValueError, match="device_budget_bytes must be positive"):
        PagedAdamW(p, device_budget_bytes=0)
    with pytest.raises(ValueError, match="not both"):
        PagedAdamW(p, device_budget_bytes=8192, pool=DevicePool(8192))
    with pytest.raises(TypeError, match="not tensors"):
        PagedAdamW(p, lr=torch.tensor(1e-3))


def test_parameter_larger_than_the_budget():
    small = torch.nn.Parameter(torch.zeros(10))
    big = torch.nn.Parameter(torch.zeros(64, 64))  # 16 KiB per state tensor: 8 pages of 4 KiB
    message = (r"a parameter of shape \(64, 64\) \(torch.float32\) needs 32768 bytes \(32.00 KiB\) of Adam "
               r"state on the device at once \(exp_avg and exp_avg_sq, 8 pages of 4096 bytes\), but the "
               r"whole device budget is 16384 bytes \(16.00 KiB\)")
    with pytest.raises(ValueError, match=message):
        PagedAdamW([small, big], device_budget_bytes=16384)
    opt = PagedAdamW([small], device_budget_bytes=16384)
    with pytest.raises(ValueError, match="needs 32768 bytes"):
        opt.add_param_group({"params": [big]})
    assert len(opt.param_groups) == 1  # the rejected group was not kept


def test_device_pool_bookkeeping_and_errors():
    pool = DevicePool(1000, record_events=True)
    a = pool.allocate(600, owner="activations", label="batch 0")
    with pool.hold(300, owner="other"):
        assert (pool.used, pool.peak, pool.available) == (900, 900, 100)
        assert pool.usage() == {"activations": 600, "other": 300}
    pool.free(a)
    assert (pool.used, pool.peak, pool.usage()) == (0, 900, {})
    pool.reset_peak()
    assert pool.peak == 0
    assert [(e.kind, e.owner, e.nbytes, e.used) for e in pool.events] == [
        ("allocate", "activations", 600, 600), ("allocate", "other", 300, 900),
        ("free", "other", 300, 600), ("free", "activations", 600, 0)]
    with pytest.raises(ValueError, match="already freed"):
        pool.free(a)
    with pytest.raises(ValueError, match="negative"):
        pool.allocate(-1)
    with pytest.raises(TypeError, match="nbytes must be an int"):
        pool.allocate(1.5)
    with pytest.raises(ValueError, match="capacity_bytes must be positive"):
        DevicePool(0)
    unlimited = DevicePool()
    unlimited.allocate(123)
    assert unlimited.available is None and unlimited.used == 123


def test_format_size_like_torch():
    assert [format_size(n) for n in (0, 1024, 1025, 1048576, 1048577, 3 * 2**30)] == [
        "0 bytes", "1024 bytes", "1.00 KiB", "1024.00 KiB", "1.00 MiB", "3.00 GiB"]


# --------------------------------------------------------------------------- state bytes


def test_optimizer_state_bytes_torch_and_paged():
    net = torch.nn.Linear(128, 64)  # 8192 + 64 parameters
    for opt in (torch.optim.AdamW(net.parameters()), PagedAdamW(net.parameters())):
        net.weight.grad = torch.ones_like(net.weight)
        net.bias.grad = torch.ones_like(net.bias)
        opt.step()
        assert optimizer_state_bytes(opt) == 2 * 4 * 8256 + 2 * 4  # two moments + two fp32 step tensors
        assert optimizer_state_bytes(opt, by_key=True) == {"step": 8, "exp_avg": 33024, "exp_avg_sq": 33024}


def test_optimizer_state_bytes_bitsandbytes_8bit():
    import qlora_lab  # noqa: F401  (before bitsandbytes)
    import bitsandbytes as bnb

    net = torch.nn.Linear(128, 64)
    opt = bnb.optim.AdamW8bit(net.parameters())
    net.weight.grad = torch.ones_like(net.weight)
    net.bias.grad = torch.ones_like(net.bias)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the 8-bit optimizer runs on CPU without complaint
        opt.step()
    # weight (8192 >= min_8bit_size 4096): uint8 moments + one fp32 absmax per 256 values;
    # bias (64 < 4096): fp32 moments; the two 256-entry quantization maps are shared, counted once
    assert optimizer_state_bytes(opt, by_key=True) == {
        "state1": 8192 + 4 * 64, "state2": 8192 + 4 * 64, "absmax1": 4 * 32, "absmax2": 4 * 32,
        "qmap1": 1024, "qmap2": 1024}


def test_optimizer_state_bytes_rejects_non_optimizers():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        optimizer_state_bytes({"state": {}})


# --------------------------------------------------------------------------- activations and training steps


def test_activation_meter_counts_each_saved_storage_once():
    x = torch.randn(5, 7, requires_grad=True)  # 140 bytes
    with ActivationMeter() as meter:
        y = x.exp()  # saves its result y
        z = y.sin()  # saves its input: y again, counted once
        (z * x).sum()  # saves z and x
    assert (meter.nbytes, meter.tensors) == (3 * 140, 3)
    linear = torch.nn.Linear(7, 3)
    with ActivationMeter(linear) as meter:  # the layer's own weight is not an activation
        linear(x)
    assert (meter.nbytes, meter.tensors) == (140, 1)
    with ActivationMeter(linear):
        with torch.no_grad():
            linear(x)
    assert ActivationMeter().nbytes == 0


def test_activation_meter_counts_the_whole_storage_of_a_view():
    x = torch.randn(10, 10, requires_grad=True)
    with ActivationMeter() as meter:
        y = x * 2
        y[:, :3].exp()  # exp saves its result: a new 10x3 tensor
        y[:5].sin()     # sin saves its input, a view of y: y's whole storage is alive
    assert meter.nbytes == 10 * 3 * 4 + 10 * 10 * 4


def test_activation_meter_charges_a_pool_and_gives_back_on_failure():
    x = torch.randn(5, 7, requires_grad=True)
    pool = DevicePool(300, record_events=True)
    meter = ActivationMeter(pool=pool)
    with meter:
        x.exp()
    assert pool.usage() == {"activations": 140} and pool.events[-1].label == "saved (5, 7) torch.float32"
    with pytest.raises(RuntimeError, match="call release"):
        with meter:
            pass
    meter.release()
    assert pool.used == 0 and meter.nbytes == 140  # the count stays readable
    with pytest.raises(DeviceOutOfMemoryError, match="Tried to allocate 140 bytes for 'activations'"):
        with meter:
            x.exp().sin() * x  # 140 + 140 fit, x does not
    assert pool.used == 0  # what the failed forward pass held was given back
    with pytest.raises(TypeError, match="DevicePool"):
        ActivationMeter(pool=300)
    with pytest.raises(TypeError, match="torch module or tensors"):
        ActivationMeter([x, 3])


def test_activation_meter_makes_the_pager_evict():
    params = _three_params(16)  # 64-byte pages, 6 pages of state
    pool = DevicePool(8 * 64)
    opt = PagedAdamW(params, page_bytes=64, pool=pool)
    _give_grads(params)
    opt.step()
    x = torch.randn(48, requires_grad=True)  # 192 bytes: 2 pages free, one more is needed
    with ActivationMeter(pool=pool) as meter:
        x.exp()
    assert opt.counters.evictions == 1 and pool.usage() == {"optimizer": 5 * 64, "activations": 192}
    meter.release()


def test_parameter_bytes_and_hold_model(tiny):
    from qlora_lab.lora import add_lora
    from qlora_lab.qlora import memory_footprint, quantize_model

    quantize_model(tiny)
    add_lora(tiny, r=4, alpha=8)
    sizes = parameter_bytes(tiny)
    trainable = sum(p.numel() * 4 for p in tiny.parameters() if p.requires_grad)
    assert sizes["adapters"] == trainable > 0
    assert sizes["weights"] + sizes["adapters"] == memory_footprint(tiny)
    pool = DevicePool(sum(sizes.values()))
    blocks = hold_model(pool, tiny)
    assert pool.usage() == sizes and len(blocks) == 2
    with pytest.raises(DeviceOutOfMemoryError):
        hold_model(pool, tiny)
    assert pool.usage() == sizes  # a failed hold_model keeps nothing
    tied = torch.nn.Linear(4, 4)
    tied_model = torch.nn.Sequential(tied, tied)
    assert parameter_bytes(tied_model) == {"weights": 0, "adapters": 80}


def _tiny_qlora(tiny):
    from qlora_lab.lora import add_lora
    from qlora_lab.qlora import quantize_model

    quantize_model(tiny)
    torch.manual_seed(0)
    add_lora(tiny, r=8, alpha=16)
    return tiny.train()


def _batches(lengths):
    gen = torch.Generator().manual_seed(1)
    out = []
    for n in lengths:
        ids = torch.randint(3, 512, (1, n), generator=gen)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_training_steps_without_a_pool_is_a_plain_training_loop(tiny):
    model = _tiny_qlora(tiny)
    plain = copy.deepcopy(model)
    batches = _batches([12, 30, 7])
    opt = torch.optim.AdamW(_trainable(model), lr=1e-2)
    traces = list(training_steps(model, batches, opt))
    plain_opt = torch.optim.AdamW(_trainable(plain), lr=1e-2)
    losses = []
    for batch in batches:
        loss = plain(**batch).loss
        loss.backward()
        plain_opt.step()
        plain_opt.zero_grad()
        losses.append(loss.item())
    assert [t.loss for t in traces] == losses
    _assert_same_params(plain, model)
    assert [t.tokens for t in traces] == [12, 30, 7]
    assert all(t.at_backward == t.at_update == {} and t.counters == {} for t in traces)
    # activations grow linearly with the length, to the byte
    per_token = (traces[1].activation_bytes - traces[0].activation_bytes) // 18
    assert all(t.activation_bytes - per_token * t.tokens == traces[0].activation_bytes - per_token * 12
               for t in traces)
    with pytest.raises(ValueError, match="no trainable parameters"):
        next(training_steps(torch.nn.Linear(2, 2).requires_grad_(False), batches, opt))


def test_training_steps_spike_fails_without_paging_and_passes_with_it(tiny):
    model = _tiny_qlora(tiny)
    batches = _batches([16, 16, 26, 16, 16])
    reference_model = copy.deepcopy(model)
    reference = list(training_steps(reference_model, batches,
                                    torch.optim.AdamW(_trainable(reference_model), lr=1e-2)))
    sizes = parameter_bytes(model)
    page = 512
    state = 2 * sizes["adapters"]  # every adapter matrix here (r=8) fills whole 512-byte pages
    steady = sizes["weights"] + sizes["adapters"] + state
    ordinary = max(t.activation_bytes for t in reference if t.step != 2)
    spike = reference[2].activation_bytes
    budget = steady + ordinary + 4 * page
    assert steady + spike > budget >= sizes["weights"] + sizes["adapters"] + spike

    def simulated(paging):
        run_model = copy.deepcopy(model)
        pool = DevicePool(budget)
        hold_model(pool, run_model)
        opt = PagedAdamW(_trainable(run_model), lr=1e-2, page_bytes=page, pool=pool, paging=paging)
        return run_model, opt, pool

    run_model, opt, pool = simulated(paging=False)
    done = []
    with pytest.raises(DeviceOutOfMemoryError, match="no pager is registered") as info:
        for trace in training_steps(run_model, batches, opt, pool):
            done.append(trace)
    assert [t.loss for t in done] == [t.loss for t in reference[:2]]
    assert info.value.usage["optimizer"] == state and info.value.usage["activations"] < spike
    assert pool.usage() == sizes | {"optimizer": state}  # the failed step gave its memory back

    run_model, opt, pool = simulated(paging=True)
    traces = list(training_steps(run_model, batches, opt, pool))
    assert [t.loss for t in traces] == [t.loss for t in reference]
    _assert_same_params(reference_model, run_model)
    shortfall = steady + spike - budget
    evicted = traces[2].counters["evictions"]
    assert evicted == -(-shortfall // page) and traces[2].counters["prefetches"] == evicted
    assert all(t.counters["bytes_moved"] == 0 for t in traces if t.step != 2)
    assert traces[0].counters["pages_created"] == state // page
    assert traces[0].at_backward == sizes | {"activations": reference[0].activation_bytes}
    for t in traces[1:]:
        optimizer_then = state - (evicted * page if t.step == 2 else 0)
        assert t.at_backward == sizes | {"optimizer": optimizer_then, "activations": t.activation_bytes}
        assert t.at_update == sizes | {"optimizer": state, "gradients": sizes["adapters"]}
        high_points = max(sum(t.at_backward.values()), sum(t.at_update.values()))
        if t.step != 2:
            assert t.peak == high_points
        else:  # just before each eviction the pool is fuller than after it (whole pages go)
            assert high_points < t.peak <= budget
    assert pool.usage() == sizes | {"optimizer": state}
