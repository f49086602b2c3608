"""The direct transport's wire format: a shard call and its answer as one frame each over a TCP stream.

A frame is a fixed prefix, a JSON header and a body of raw tensor bytes:

    prefix  <I header bytes><Q body bytes>   (little-endian, 12 bytes)
    header  {"id": n, ..., "tensors": [[dtype, shape, offset], ...]}
    body    each tensor's bytes at its offset, offsets aligned to ALIGN bytes

or, on a stream with a row channel (`direct_rows: collective`, serving/experts/row_channel.py), a header
whose tensors have offset null and an empty body: the tensors follow on the channel, in the header's order,
device to device.

A call's header has "layer" and "version" (the router's shard_version, or null) and four tensors
(ShardCall: hidden, local_rows, experts, weights); an answer's header has "status": "ok" with one
tensor (the partial sums) and "compute_s" (the shard's own seconds on the call, so that the router can tell
its hop from the shard's work), "stale" (the replica is of another app version) or "error" (the shard's own
code raised), those two with a "detail". No pickle: a frame carries only numbers, so a peer can make the
other side compute experts and nothing else.

Copies: sending joins the prefix, header and tensor bytes into one buffer (one copy of the rows, then one
`sendall`); receiving reads the body into one bytearray and the tensors are views into it (no copy). On a
channel the frame holds no tensor bytes at all.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass

import torch
from torch import Tensor

from serving.experts.row_channel import RowChannel
from serving.experts.sharded import ShardCall

PREFIX = struct.Struct("<IQ")
ALIGN = 64  # every tensor starts at a multiple of this (dtype views need aligned offsets)
MAX_HEADER = 1 << 20  # a header is a few hundred bytes; more means the peer speaks another protocol
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.int64)}


class WireError(ConnectionError):
    """The peer sent something that is not a frame of this protocol, or closed the stream mid-frame."""


@dataclass(frozen=True)
class Frame:
    header: dict
    tensors: list[Tensor]


def encode(header: dict, tensors: list[Tensor], on_channel: bool = False) -> bytes:
    """One frame: `header` (JSON-serialisable, without "tensors") and the tensors' bytes (CPU tensors), or
    with `on_channel` only their dtypes and shapes (the sender then sends them on the stream's RowChannel)."""
    parts, described, offset = [], [], 0
    for t in tensors:
        name = str(t.dtype).removeprefix("torch.")
        if name not in DTYPES:
            raise ValueError(f"wire: dtype {t.dtype} is not one of {sorted(DTYPES)}")
        if on_channel:
            described.append([name, list(t.shape), None])
            continue
        if t.device.type != "cpu":
            raise ValueError(f"wire: tensors go over the wire from the host, not {t.device}")
        raw = t.contiguous().view(-1).view(torch.uint8).numpy() if t.numel() else b""  # a view, no copy yet
        pad = -offset % ALIGN
        parts += [b"\0" * pad, raw]
        offset += pad
        described.append([name, list(t.shape), offset])
        offset += len(raw)
    head = json.dumps(header | {"tensors": described}, separators=(",", ":")).encode()
    return b"".join([PREFIX.pack(len(head), offset), head, *parts])


def read_frame(sock: socket.socket, channel: RowChannel | None = None) -> Frame:
    """The next frame on `sock` (blocking, under the socket's own timeout), its tensors read from the body
    or, where the header puts them on the channel, received from `channel` onto its device (always, even
    for a frame the caller then ignores: the channel must stay in step with the stream). WireError on a
    closed stream, bytes that are not a frame, or a channel that broke; socket.timeout when the peer is
    silent past the timeout."""
    head_len, body_len = PREFIX.unpack(_read_exactly(sock, PREFIX.size))
    if head_len > MAX_HEADER:
        raise WireError(f"wire: a {head_len}-byte header is not a frame of this protocol")
    header = json.loads(_read_exactly(sock, head_len))
    body = _read_exactly(sock, body_len)
    described = header.pop("tensors")
    if any(offset is None for _, _, offset in described):
        if channel is None:
            raise WireError("wire: the frame's tensors are on a row channel, and this stream has none")
        try:
            return Frame(header, channel.recv([(DTYPES[name], tuple(shape)) for name, shape, _ in described]))
        except RuntimeError as e:  # the peer died or the channel timed out mid-call
            raise WireError(f"wire: the row channel broke ({e})") from e
    tensors = []
    for name, shape, offset in described:
        dtype = DTYPES[name]
        count = 1
        for n in shape:
            count *= n
        if count == 0:
            tensors.append(torch.empty(shape, dtype=dtype))
            continue
        tensors.append(torch.frombuffer(body, dtype=dtype, count=count, offset=offset).view(shape))
    return Frame(header, tensors)


def _read_exactly(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise WireError(f"wire: the peer closed the stream {got} bytes into a {n}-byte read")
        got += k
    return buf


def encode_call(request_id: int, layer: int, version: str | None, call: ShardCall, on_channel: bool = False) -> bytes:
    header = {"id": request_id, "layer": layer, "version": version}
    return encode(header, call.parts(), on_channel)


def decode_call(frame: Frame) -> tuple[int, int, str | None, ShardCall]:
    """(request id, layer, version, call) of a call frame."""
    h = frame.header
    if len(frame.tensors) != 4:
        raise WireError(f"wire: a call carries 4 tensors, this one {len(frame.tensors)}")
    return int(h["id"]), int(h["layer"]), h.get("version"), ShardCall(*frame.tensors)


def encode_answer(
    request_id: int,
    status: str,
    out: Tensor | None = None,
    detail: str = "",
    on_channel: bool = False,
    compute_s: float | None = None,
) -> bytes:
    header = {"id": request_id, "status": status, "detail": detail}
    if compute_s is not None:
        header["compute_s"] = round(compute_s, 6)
    return encode(header, [] if out is None else [out], on_channel)
