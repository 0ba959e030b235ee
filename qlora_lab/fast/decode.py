"""4-bit dequantization at memory speed.

Reference: :func:`qlora_lab.quant.nf4.dequantize_4bit`, which unpacks the nibbles,
looks each one up in the code and multiplies by its block's absmax, in
float32, then rounds once to the output dtype. :func:`decode_packed` returns
the same values bit for bit.

Dequantization is bound by memory, not arithmetic. Three costs, found by
measuring a 4096 x 4096 NF4 matrix on the course's 2-core machine, shape the code:

* **Two values per look-up.** :func:`byte_pair_table` holds, for each of the
  256 byte values, its two decoded float32 values as one 8-byte entry, so one
  gather decodes both nibbles of a byte and the unpacked indices never exist.
  On a CPU it is built once per code and cached; on a GPU it is built on the
  device at each call (:func:`device_byte_pair_table`), which never waits for the host.
* **Fresh memory.** The 64 MiB float32 output is a new mapping that the OS
  zeroes page by page on first touch: in 4 KiB pages that took longer than
  the decoding itself. numpy asks Linux for 2 MiB pages (``madvise
  MADV_HUGEPAGE``) for arrays of 4 MiB and more, 512 times fewer faults, so
  CPU outputs are allocated through numpy (:func:`new_output`).
* **Threads.** PyTorch's CPU ``index_select`` runs on one core. Tensors of at
  least ``PARALLEL_MIN_BYTES`` packed bytes are split between
  ``torch.get_num_threads()`` Python threads (PyTorch releases the GIL inside
  its operators), each decoding its own part of the output in steps of
  ``DECODE_CHUNK`` bytes, whose 2 MiB of float32 values are still in cache
  when they are multiplied by absmax. Steps start on block boundaries
  (``2 * DECODE_CHUNK`` values is a multiple of every block size), so only the
  last one can end with a partial block. Smaller tensors are decoded by the
  calling thread in one step (a thread would cost more than it saves).
* **One OpenMP thread meanwhile.** Each step's ``mul_`` and index copy are
  large enough for PyTorch to split them between its OpenMP threads, so two
  Python threads would each start an OpenMP team on a 2-core machine, four
  busy threads fighting for two cores. While the Python threads decode,
  ``torch.set_num_threads(1)`` holds (restored afterwards, also on error).
  PyTorch's thread count is global: another Python thread running PyTorch
  at the same moment runs on one thread for those milliseconds. What each of
  these gained, by shape: ``bench/speed_choices.md``.
"""

from __future__ import annotations

import functools
import threading

import numpy
import torch

DECODE_CHUNK = 1 << 18
PARALLEL_MIN_BYTES = 1 << 20


@functools.lru_cache(maxsize=16)
def _byte_pairs_for(code_bytes: bytes) -> torch.Tensor:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    byte = torch.arange(256)
    pairs = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1).contiguous()
    return pairs.view(torch.int64).reshape(256)


def byte_pair_table(code: torch.Tensor) -> torch.Tensor:
    """For each of the 256 byte values its two decoded values (high nibble,
    low nibble) as one 8-byte entry, so that one gather decodes two weights.
    Stored as int64 so that the look-up copies bits and never touches them
    as floating-point numbers."""
    if code.numel() != 16:
        raise ValueError(f"a 4-bit code has 16 values, got {code.numel()}")
    code = code.detach().to("cpu", torch.float32).contiguous()
    return _byte_pairs_for(code.numpy().tobytes())


def device_byte_pair_table(code: torch.Tensor) -> torch.Tensor:
    """:func:`byte_pair_table` built where ``code`` is, by tensor operations:
    on a GPU, the cached table would cost a copy of the code to the host (a
    synchronisation) and of the table back at every layer call, thousands a
    step; this costs two small gathers on the device and no synchronisation."""
    if code.numel() != 16:
        raise ValueError(f"a 4-bit code has 16 values, got {code.numel()}")
    code = code.detach().reshape(-1).to(torch.float32)
    byte = torch.arange(256, device=code.device)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1).contiguous().view(torch.int64).reshape(256)


def new_output(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised 1-D tensor; on CPU backed by a numpy array, so that
    large outputs are mapped in 2 MiB pages where the OS allows it."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(numpy.empty(numel * itemsize, dtype=numpy.uint8)).view(dtype)


def decode_packed(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, n: int,
                  dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``code[nibble] * absmax[block]`` for the ``n`` values packed in
    ``packed`` (high nibble first), in float32, rounded once to ``dtype``;
    a 1-D tensor of ``n`` values, written into ``out`` if it is given (a
    contiguous tensor of ``n`` values of ``dtype`` on ``packed``'s device,
    reused from call to call: no fresh memory to map)."""
    flat = packed.reshape(-1)
    absmax = absmax.float()
    device = flat.device
    pairs = byte_pair_table(code) if device.type == "cpu" else device_byte_pair_table(code.to(device))
    # float32 is decoded straight into the output, two values per byte: one
    # padding value when n is odd, which a given `out` has no room for.
    if out is None:
        out = new_output(2 * flat.numel() if dtype == torch.float32 else n, dtype, device)
    else:
        check_output(out, n, dtype, device)
        if dtype == torch.float32 and n % 2:
            return out.view(-1).copy_(decode_packed(packed, absmax, code, blocksize, n, dtype))
        out = out.view(-1)
    if device.type != "cpu" or flat.numel() < PARALLEL_MIN_BYTES:
        # One thread, one step: PyTorch's own threads share the copy and the
        # multiplication, and there is no per-step overhead.
        decode_range(flat, 0, flat.numel(), max(flat.numel(), 1), pairs, absmax, blocksize, n, out)
        return out[:n]
    steps = -(-flat.numel() // DECODE_CHUNK)
    workers = max(1, min(torch.get_num_threads(), steps))
    per_worker = -(-steps // workers) * DECODE_CHUNK
    ranges = [(start, min(start + per_worker, flat.numel())) for start in range(0, flat.numel(), per_worker)]

    def decode(bounds: tuple[int, int]) -> None:
        decode_range(flat, bounds[0], bounds[1], DECODE_CHUNK, pairs, absmax, blocksize, n, out)

    helpers = [threading.Thread(target=run_catching, args=(decode, bounds)) for bounds in ranges[1:]]
    openmp_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Python threads are the parallelism (module docstring)
    try:
        for helper in helpers:
            helper.start()
        decode(ranges[0])
    finally:
        for helper in helpers:
            if helper.ident is not None:  # started
                helper.join()
        torch.set_num_threads(openmp_threads)
    for helper in helpers:
        if helper.error is not None:
            raise helper.error
    return out[:n]


def check_output(out: torch.Tensor, n: int, dtype: torch.dtype, device: torch.device) -> None:
    """ValueError/TypeError unless ``out`` can hold the ``n`` decoded values."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.numel() != n or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {str(dtype).removeprefix('torch.')} tensor of {n} values on "
                         f"{device}, got a {'' if out.is_contiguous() else 'non-contiguous '}"
                         f"{str(out.dtype).removeprefix('torch.')} tensor of {out.numel()} values on {out.device}; "
                         f"allocate it once with torch.empty(state.shape, dtype=state.dtype, device=packed.device)")


def run_catching(fn, *args) -> None:
    """Run ``fn(*args)`` in a helper thread, keeping an exception on the
    thread object for the caller to raise."""
    thread = threading.current_thread()
    thread.error = None
    try:
        fn(*args)
    except BaseException as error:  # re-raised in the calling thread
        thread.error = error


def decode_range(flat: torch.Tensor, start: int, stop: int, chunk: int, pairs: torch.Tensor,
                  absmax: torch.Tensor, blocksize: int, n: int, out: torch.Tensor) -> None:
    """Decode bytes ``start:stop`` of ``flat`` into ``out``, ``chunk`` bytes at a
    time (``start`` and ``chunk`` on block boundaries): the bytes become int32
    indices, one ``index_select`` in the byte-pair table writes two float32
    values per byte, which are then multiplied by their blocks' absmax in
    place (and, for a half-precision ``out``, rounded into it)."""
    step = min(stop - start, chunk)
    index = torch.empty(step, dtype=torch.int32, device=flat.device)
    buffer = None if out.dtype == torch.float32 else torch.empty(2 * step, dtype=torch.float32, device=flat.device)
    for begin in range(start, stop, chunk):
        piece = flat[begin:min(begin + chunk, stop)]
        first, last = 2 * begin, min(2 * (begin + piece.numel()), n)
        values = out[first:first + 2 * piece.numel()] if buffer is None else buffer[: 2 * piece.numel()]
        torch.index_select(pairs, 0, index[: piece.numel()].copy_(piece), out=values.view(torch.int64))
        values = values[: last - first]
        _multiply_by_absmax(values, absmax[first // blocksize: -(-last // blocksize)], blocksize)
        if buffer is not None:
            out[first:last].copy_(values)


def _multiply_by_absmax(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> None:
    """``values *= absmax`` of each value's block, in place (float32; the
    first value starts a block, the last block may be partial)."""
    n = values.numel()
    full = n - n % blocksize
    blocks = full // blocksize
    values[:full].view(blocks, blocksize).mul_(absmax[:blocks].view(-1, 1))
    if full < n:
        values[full:].mul_(absmax[blocks])
