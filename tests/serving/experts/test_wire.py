"""The direct transport's frames and the shard's TCP server: tensors arrive bit for bit, answers carry the
shard's status, and a bad peer loses only its own connection. Rows on a row channel (gloo here, NCCL's CPU
equivalent) arrive bit for bit too, with frames that only describe them."""

from __future__ import annotations

import multiprocessing
import socket
import threading

import pytest
import torch

from serving.errors import StalePlacementError
from serving.experts.row_channel import ROUTER_RANK, ChannelStore, RowChannel, backend_for, rows_on_channel
from serving.experts.shard_server import ShardServer
from serving.experts.sharded import ShardCall
from serving.experts.wire import WireError, decode_call, encode, encode_call, read_frame

CPU = torch.device("cpu")


def _pair():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_call_arrives_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(0)
    call = ShardCall(torch.randn(5, 7, generator=gen).to(dtype), torch.tensor([0, 2, 4]), torch.tensor([3, 1, 9]),
                     torch.rand(3, generator=gen).to(dtype))  # fmt: skip
    a, b = _pair()
    a.sendall(encode_call(41, 3, "v1", call))
    request_id, layer, version, got = decode_call(read_frame(b))
    assert (request_id, layer, version) == (41, 3, "v1")
    for sent, received in zip((call.hidden, call.local_rows, call.experts, call.weights), (got.hidden,
                              got.local_rows, got.experts, got.weights), strict=True):  # fmt: skip
        assert received.dtype == sent.dtype and received.shape == sent.shape
        assert torch.equal(received.view(torch.uint8), sent.view(torch.uint8))


def test_empty_tensors_and_several_frames_in_a_row():
    a, b = _pair()
    a.sendall(encode({"n": 1}, [torch.empty(0, 4), torch.arange(3)]) + encode({"n": 2}, []))
    first, second = read_frame(b), read_frame(b)
    assert first.header == {"n": 1} and first.tensors[0].shape == (0, 4) and first.tensors[1].tolist() == [0, 1, 2]
    assert second.header == {"n": 2} and second.tensors == []


def test_a_stream_closed_mid_frame_is_a_wire_error():
    a, b = _pair()
    a.sendall(encode({"n": 1}, [torch.ones(100)])[:50])
    a.close()
    with pytest.raises(WireError, match="closed"):
        read_frame(b)


def test_a_dtype_the_wire_does_not_know_is_refused_by_name():
    with pytest.raises(ValueError, match="complex64"):
        encode({}, [torch.zeros(2, dtype=torch.complex64)])


def _handler(layer, call, version):
    if version == "old":
        raise StalePlacementError("replica of version new")
    if layer < 0:
        raise ValueError("layer must be >= 0")
    return call.hidden * layer


def _ask(sock, request_id, layer, version=None):
    call = ShardCall(torch.ones(2, 3), torch.tensor([0, 1]), torch.tensor([0, 0]), torch.ones(2))
    sock.sendall(encode_call(request_id, layer, version, call))
    return read_frame(sock)


def test_the_server_answers_ok_stale_and_error_and_keeps_the_connection():
    server = ShardServer(_handler, "127.0.0.1")
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            ok = _ask(sock, 1, 3)
            assert ok.header["status"] == "ok" and ok.header["id"] == 1
            assert torch.equal(ok.tensors[0], torch.full((2, 3), 3.0))
            assert 0 <= ok.header["compute_s"] < 1  # the shard's own time on the call (test_direct_transport times it)
            stale = _ask(sock, 2, 3, version="old")
            assert stale.header["status"] == "stale" and "version new" in stale.header["detail"]
            assert "compute_s" not in stale.header
            error = _ask(sock, 3, -1)
            assert error.header["status"] == "error" and "layer must be >= 0" in error.header["detail"]
            assert _ask(sock, 4, 2).header["status"] == "ok"  # the same stream still serves
    finally:
        server.close()


def test_a_peer_sending_garbage_loses_only_its_own_connection():
    server = ShardServer(_handler, "127.0.0.1")
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as bad:
            bad.sendall(b"\xff" * 64)  # a 4 GiB header: not this protocol
            try:
                assert bad.recv(1) == b""  # the server closed it...
            except ConnectionResetError:  # ...with our unread bytes still in its buffer
                pass
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as good:
            assert _ask(good, 1, 1).header["status"] == "ok"
    finally:
        server.close()


def test_closing_the_server_ends_open_streams():
    server = ShardServer(_handler, "127.0.0.1")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    assert _ask(sock, 1, 1).header["status"] == "ok"
    server.close()
    with pytest.raises((WireError, ConnectionError)):
        _ask(sock, 2, 1)
    sock.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5)


def test_a_frame_that_puts_its_rows_on_a_channel_carries_none_and_needs_one():
    call = ShardCall(torch.randn(6, 8), torch.tensor([0, 5]), torch.tensor([2, 7]), torch.rand(2))
    frame = encode_call(7, 1, None, call, on_channel=True)
    assert len(frame) < len(encode_call(7, 1, None, call)) - 6 * 8 * 4  # the header only, no row bytes
    a, b = _pair()
    a.sendall(frame)
    with pytest.raises(WireError, match="row channel"):  # a stream with no channel cannot take such a frame
        read_frame(b)


def _serve_with_channels(out) -> None:
    server = ShardServer(_handler, "127.0.0.1", channel_device=CPU)
    out.put((server.port, server.store_port))
    threading.Event().wait()


def test_the_server_answers_on_the_channel_a_router_opened_and_in_frames_on_a_stream_without_one():
    ctx = multiprocessing.get_context("spawn")  # a channel's two ends are two processes, as in a cluster
    ports = ctx.Queue()
    process = ctx.Process(target=_serve_with_channels, args=(ports,), daemon=True)
    process.start()
    try:
        port, store_port = ports.get(timeout=60)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(encode({"hello": "r1"}, []))
            channel = RowChannel.open(ChannelStore.client_of("127.0.0.1", store_port), "r1", ROUTER_RANK, CPU)
            gen = torch.Generator().manual_seed(1)
            # 5 x 3 bf16 is 30 bytes: the int64 tensors after it in the packed buffer start at a padded offset
            for request_id, (layer, dtype) in enumerate([(3, torch.float32), (5, torch.bfloat16)]):
                call = ShardCall(torch.randn(5, 3, generator=gen).to(dtype), torch.tensor([0, 4]),
                                 torch.tensor([0, 0]), torch.ones(2, dtype=dtype))  # fmt: skip
                sock.sendall(encode_call(request_id, layer, None, call, on_channel=True))
                sends = channel.send(call.parts())
                answer = read_frame(sock, channel)
                assert answer.header["status"] == "ok" and answer.tensors[0].dtype == dtype
                assert torch.equal(answer.tensors[0], call.hidden * layer)  # the rows arrived bit for bit
                for work, _ in sends:
                    work.wait()
            sock.sendall(encode_call(9, 3, "old", call, on_channel=True))
            sends = channel.send(call.parts())  # kept until answered (a dropped send may never go out)
            stale = read_frame(sock, channel)
            assert stale.header["status"] == "stale" and stale.tensors == []
            sock.sendall(encode_call(10, 2, None, call, on_channel=True))  # the stream still serves
            sends = channel.send(call.parts())
            assert read_frame(sock, channel).header["status"] == "ok"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:  # no hello: rows in frames
            assert torch.equal(_ask(plain, 1, 2).tensors[0], torch.full((2, 3), 2.0))
    finally:
        process.kill()
        process.join(10)


def test_rows_go_on_channels_between_cuda_devices_under_auto_and_always_under_collective():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert [rows_on_channel(rows, cuda) for rows in ("auto", "frames", "collective")] == [True, False, True]
    assert [rows_on_channel(rows, cpu) for rows in ("auto", "frames", "collective")] == [False, False, True]
    assert (backend_for(cuda), backend_for(cpu)) == ("nccl", "gloo")
