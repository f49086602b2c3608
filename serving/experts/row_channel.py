"""A shard call's tensors rank to rank: the direct transport's collective row path (`direct_rows: collective`).

Over `transport: direct` a call's rows normally ride inside its frame as host bytes (serving/experts/wire.py).
Between GPU replicas that costs a device->host copy on the sender and a host->device copy on the receiver,
both ways, every MoE layer. A RowChannel instead joins one router stream and one shard replica in a
torch.distributed process group of two ranks, and the tensors go from one device to the other:

    NCCL  between CUDA devices: GPU to GPU, no host copy on either side;
    gloo  between CPU processes: the same code path on the host (what tests run; slower than frames there).

The frame still goes over the TCP stream (ids, layer, version, each tensor's dtype and shape, marked
"on the channel"), so every rule of the direct transport (which replica, hedges, timeouts, stale
versions, a killed peer) stays as it is; the tensors follow it on the channel as one message, packed
into one byte buffer in the frame's order (one op per direction instead of one per tensor).

    >>> store = ChannelStore(host)                                    # shard replica: one per replica
    >>> channel = RowChannel.open(ChannelStore.client_of(host, store.port), key, ROUTER_RANK, router_device)
    >>> sends = channel.send([hidden, rows, experts, weights])         # after the frame that describes them
    >>> out, = channel.recv([(torch.bfloat16, (12, 2048))])            # views into one buffer on the device

The group is made directly from a store (no `init_process_group`, no global state), so a process holds one
per open stream and drops it with the stream. A peer that dies fails the next send or recv (gloo: its TCP
pair closes; NCCL: the op errors, or the communicator's timeout fires), and the direct transport treats
that as the replica gone. The rendezvous store is a TCPStore the shard replica hosts on a port of its own,
published beside its call port; each stream's group lives under its own key prefix there.
"""

from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger(__name__)

ROUTER_RANK, SHARD_RANK = 0, 1


def rows_on_channel(direct_rows: str, device: torch.device) -> bool:
    """Whether a replica computing on `device` moves rows on channels under `direct_rows` (the app config's
    auto | frames | collective; both ends decide it for themselves, and a stream gets a channel only where
    both do)."""
    return direct_rows == "collective" or (direct_rows == "auto" and device.type == "cuda")


def backend_for(device: torch.device) -> str:
    """The collective backend that moves tensors of `device`: nccl for CUDA, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


class ChannelStore:
    """The rendezvous store a shard replica hosts for the routers' channels (a TCPStore on a free port)."""

    def __init__(self, host: str, timeout_s: float = 10.0):
        self.store = dist.TCPStore(
            host, 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s)
        )
        self.port = self.store.port

    @staticmethod
    def client_of(host: str, port: int, timeout_s: float = 10.0) -> dist.Store:
        """A router's connection to the store of the shard replica at host:port."""
        return dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


class RowChannel:
    """One end of a two-rank process group that carries a stream's tensors (the other end is the peer rank)."""

    def __init__(self, group, rank: int, device: torch.device):
        self.group, self.rank, self.device = group, rank, device
        self.peer = 1 - rank
        self.backend = backend_for(device)

    @classmethod
    def open(cls, store: dist.Store, key: str, rank: int, device: torch.device, timeout_s: float = 10.0) -> RowChannel:
        """Join group `key` on `store` as `rank`; returns once the peer has joined too (both sides call this).
        The timeout also bounds every send and recv on the channel."""
        prefixed = dist.PrefixStore(f"rows/{key}/", store)
        timeout = datetime.timedelta(seconds=timeout_s)
        # Meet first through the store, whose wait lets go of the GIL: the group's constructor holds it while
        # it waits for the peer, so a peer that never comes would stall every other thread of this process.
        prefixed.set(f"arrived/{rank}", b"1")
        prefixed.wait([f"arrived/{1 - rank}"], timeout)
        if backend_for(device) == "nccl":
            if not dist.is_nccl_available():
                raise RuntimeError(f"direct_rows: collective on {device} needs NCCL, and this torch has none")
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            group = dist.ProcessGroupNCCL(prefixed, rank, 2, options)
        else:
            group = dist.ProcessGroupGloo(prefixed, rank, 2, timeout=timeout)
        return cls(group, rank, device)

    def send(self, tensors: list[Tensor]) -> list:
        """Post one send to the peer of all `tensors` packed into one byte buffer on the channel's device (one
        message per call: each gloo or NCCL op costs a handoff to its worker threads, so four small messages
        cost several times one). Returns the works, which the caller keeps (and the buffer with them) until
        the peer has answered. The packing is one device-side copy of the rows."""
        packed = _pack([t.to(self.device) for t in tensors])
        return [(self.group.send([packed], self.peer, 0), packed)] if packed.numel() else []

    def recv(self, described: list[tuple[torch.dtype, tuple[int, ...]]]) -> list[Tensor]:
        """Receive the tensors of each (dtype, shape), packed as `send` packs them, onto the channel's device
        (blocking until they are here: the frame that describes them went first, so they are on their way).
        The tensors are views into the one buffer received."""
        like = [torch.empty(shape, dtype=dtype, device="meta") for dtype, shape in described]  # shapes, no memory
        packed = torch.empty(_packed_bytes(like), dtype=torch.uint8, device=self.device)
        if packed.numel():
            self.group.recv([packed], self.peer, 0).wait()
        return _unpack(packed, like)

    def close(self) -> None:
        """Drop the group (the peer's next op on it fails, which ends its stream too)."""
        abort = getattr(self.group, "abort", None)  # NCCL: tear the communicator down now
        if abort is not None and self.backend == "nccl":
            try:
                abort()
            except Exception as e:  # already broken: nothing left to free
                log.debug("row channel abort: %s", e)
        self.group = None


ALIGN = 8  # bytes: every packed tensor starts at a multiple of its element size (int64 is the widest)


def _padded(t: Tensor) -> int:
    n = t.numel() * t.element_size()
    return n + (-n % ALIGN)


def _packed_bytes(tensors: list[Tensor]) -> int:
    return sum(_padded(t) for t in tensors)


def _pack(tensors: list[Tensor]) -> Tensor:
    """[bytes] uint8: each tensor's bytes in order, each padded to ALIGN."""
    device = tensors[0].device if tensors else torch.device("cpu")
    packed = torch.zeros(_packed_bytes(tensors), dtype=torch.uint8, device=device)
    offset = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        if n:
            packed[offset : offset + n] = t.contiguous().view(-1).view(torch.uint8)
        offset += _padded(t)
    return packed


def _unpack(packed: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Tensors on packed's device with the dtypes and shapes of `like` (meta tensors that describe them): views
    into `packed`, or new empty tensors for those with no elements."""
    out, offset = [], 0
    for t in like:
        n = t.numel() * t.element_size()
        if n:
            out.append(packed[offset : offset + n].view(t.dtype).view(t.shape))
        else:
            out.append(torch.empty(t.shape, dtype=t.dtype, device=packed.device))
        offset += _padded(t)
    return out
