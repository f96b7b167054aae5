"""Server mode: the vLLM engine in a process of its own (other devices or nodes), the trainer talking to it.

    ptk vllm-serve --model out/sft --port 8765        # python -m ptkernels.trainers.rollout.vllm_server
    engine = VLLMServerClient("127.0.0.1", 8765)      # a RolloutEngine in the trainer
    rollout = engine.generate(prompt_ids, SamplingConfig(...), seed=step)
    engine.sync_weights(policy)                       # after an optimizer step

The server holds a ``VLLMEngine``; the trainer pushes its weights over the socket, streamed in buckets of whole
tensors (``bucket_bytes``) as safetensors blobs, straight into the engine's in-place reload (one parameter at a
time on both sides: no full copy of the model is ever held, no disk round-trip). Requests are a JSON header
(8-byte length first); nothing received is unpickled or evaluated: token ids and log-probs travel as JSON, tensors
as safetensors. One client at a time (the trainer's rank 0; under FSDP2 the other ranks take part in the gathers
with ``vllm_engine.sync_weights(model, None)``).

This is the CPU / loopback transport. On GPUs a socket is the slow path: vLLM 0.32's own server
(``vllm serve``) has weight-update endpoints for it (``/pause``, ``/init_weight_transfer_engine``,
``/start_weight_update``, ``/update_weights``, ``/finish_weight_update``, ``/resume``) whose NCCL backend
broadcasts the tensors from the trainer's GPU to the engine's.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
from dataclasses import asdict, fields

from .vllm_engine import SamplingConfig, VLLMEngine, VLLMRollout, iter_full_weights

__all__ = ["VLLMServerClient", "main", "serve"]

_LENGTH = struct.Struct(">Q")


def _send(conn: socket.socket, payload: bytes) -> None:
    conn.sendall(_LENGTH.pack(len(payload)) + payload)


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the peer closed the connection mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(conn: socket.socket) -> bytes:
    return _recv_exactly(conn, _LENGTH.unpack(_recv_exactly(conn, _LENGTH.size))[0])


def _send_json(conn, obj) -> None:
    _send(conn, json.dumps(obj).encode())


def _recv_json(conn):
    return json.loads(_recv(conn))


# -- server ---------------------------------------------------------------------------------------------------------


def _received_weights(conn):
    """(name, tensor) pairs from the safetensors blobs read off ``conn`` one at a time, up to an empty frame."""
    from safetensors.torch import load

    while blob := _recv(conn):
        yield from load(blob).items()


def _handle(engine: VLLMEngine, conn) -> bool:
    """Answer one request; False when the client asked the server to stop."""
    request = _recv_json(conn)
    op = request.get("op")
    try:
        if op == "generate":
            known = {f.name for f in fields(SamplingConfig)}
            sampling = SamplingConfig(**{k: v for k, v in request["sampling"].items() if k in known})
            rollout = engine.generate(request["prompts"], sampling, seed=request.get("seed"))
            _send_json(conn, {"ok": True, "rollout": asdict(rollout)})
        elif op == "load_weights":
            engine.load_weights(_received_weights(conn))
            _send_json(conn, {"ok": True})
        elif op == "stop":
            _send_json(conn, {"ok": True})
            return False
        else:
            _send_json(conn, {"ok": False, "error": f"unknown request {op!r}"})
    except (ValueError, RuntimeError) as error:  # a bad request: report it, keep serving
        _send_json(conn, {"ok": False, "error": f"{type(error).__name__}: {error}"})
    return True


def serve(engine: VLLMEngine, host: str = "127.0.0.1", port: int = 0, port_file: str | None = None) -> None:
    """Serve ``engine`` until a client sends ``stop``. ``port=0`` picks a free port, written to ``port_file``
    (and printed) once the engine is ready to answer."""
    with socket.create_server((host, port)) as server:
        bound = server.getsockname()[1]
        if port_file:
            tmp = f"{port_file}.tmp"
            with open(tmp, "w") as f:
                f.write(str(bound))
            os.replace(tmp, port_file)  # the client never reads a half-written number
        print(f"vllm-serve: ready on {host}:{bound}", flush=True)
        running = True
        while running:
            conn, _ = server.accept()
            with conn:
                try:
                    while running:
                        running = _handle(engine, conn)
                except ConnectionError:
                    continue  # the client went away: wait for the next one


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ptk vllm-serve", description="Serve rollouts from a vLLM engine; the "
                                     "trainer (VLLMServerClient) pushes its weights to it in place.")
    parser.add_argument("--model", required=True, help="the policy's Hugging Face folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8765, help="0: any free port (see --port-file)")
    parser.add_argument("--port-file", default=None, help="write the bound port here once ready")
    parser.add_argument("--max-length", type=int, default=1024, help="prompt + completion tokens per sequence")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="CUDA: fraction of the device for weights + KV cache (the engine has it alone)")
    args = parser.parse_args(argv)
    engine = VLLMEngine(args.model, max_model_len=args.max_length, dtype=args.dtype, seed=args.seed,
                        gpu_memory_utilization=args.gpu_memory_utilization)
    serve(engine, args.host, args.port, args.port_file)


# -- client ---------------------------------------------------------------------------------------------------------


class VLLMServerClient:
    """A ``RolloutEngine`` whose samples come from a ``vllm_server`` process; ``sync_weights`` pushes the
    trainer's weights to it. ``tokenizer``: the policy's, to decode the completions (the server sends ids)."""

    def __init__(self, host: str, port: int, *, timeout: float | None = 600.0, bucket_bytes: int = 64 << 20):
        self.conn = socket.create_connection((host, port), timeout=timeout)
        self.bucket_bytes = bucket_bytes

    def _call(self, header: dict, blobs=()) -> dict:
        _send_json(self.conn, header)
        for blob in blobs:
            _send(self.conn, blob)
        reply = _recv_json(self.conn)
        if not reply.get("ok"):
            raise RuntimeError(f"vllm-serve: {reply.get('error')}")
        return reply

    def generate(self, prompts, sampling, *, seed: int | None = None) -> VLLMRollout:
        reply = self._call({"op": "generate", "prompts": [list(map(int, p)) for p in prompts],
                            "sampling": asdict(sampling), "seed": seed})
        return VLLMRollout(**reply["rollout"])

    def _buckets(self, weights):
        """safetensors blobs of whole tensors, about ``bucket_bytes`` each, then the empty end frame. Made one at
        a time as the request is sent: each bucket is gathered and serialized after the previous one is gone."""
        from safetensors.torch import save

        bucket: dict = {}
        size = 0
        for name, tensor in weights:
            # a copy: tied tensors share storage, which safetensors refuses within one blob
            bucket[name] = tensor.detach().to("cpu", copy=True).contiguous()
            size += tensor.numel() * tensor.element_size()
            if size >= self.bucket_bytes:
                yield save(bucket)
                bucket, size = {}, 0
        if bucket:
            yield save(bucket)
        yield b""

    def load_weights(self, weights) -> None:
        """Stream (Hugging Face name, tensor) pairs into the server's engine (an in-place reload there)."""
        self._call({"op": "load_weights"}, self._buckets(weights))

    def sync_weights(self, model) -> None:
        """Push ``model``'s current weights to the server's engine. Under FSDP2 the ranks without the client
        call ``vllm_engine.sync_weights(model, None)`` at the same time (the gathers are collectives)."""
        self.load_weights(iter_full_weights(model))

    def stop_server(self) -> None:
        self._call({"op": "stop"})

    def close(self) -> None:
        self.conn.close()


if __name__ == "__main__":
    main()
