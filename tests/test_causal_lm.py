"""Causal LM end to end on tiny random decoders: train (prompt/completion and plain text), export
merged and factored with the KV cache, check ONNX Runtime against the in-memory trained model,
generate token for token like transformers, load in Optimum and a pipeline, serve over HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from adalora_deploy.cli import main
from adalora_deploy.exporters import export
from adalora_deploy.runtime import Predictor
from adalora_deploy.runtime.server import ServerConfig, create_app
from adalora_deploy.training import train

from .test_data import write_jsonl
from .test_server import free_port, serving
from .tiny_decoders import prompt_rows, save_tiny_decoder, text_rows

PROMPTS = ["the quick brown fox", "red", "hello world, this is a small"]  # different lengths: left padding
NEW_TOKENS = 20
ATOL = 1e-4


def _train_and_export(tmp: Path, model_type: str, rows: list[dict]):
    base = save_tiny_decoder(tmp / "base", model_type)
    data = write_jsonl(tmp / "train.jsonl", rows)
    # A high learning rate moves lam far enough from 0 that the adapters change every output.
    result = train(model=str(base), data=str(data), task="causal-lm", steps=6, batch_size=4, lr=5e-2,
                   init_r=4, target_r=2, tinit=1, tfinal=2, out=str(tmp / "ckpt"), progress=False)
    root = export(tmp / "ckpt", tmp / "onnx", prune_ranks=True)
    return result, root


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def trained(request, tmp_path_factory):
    rows = prompt_rows() if request.param == "llama" else text_rows()
    result, root = _train_and_export(tmp_path_factory.mktemp(f"lm-{request.param}"), request.param, rows)
    return result.model.eval(), root


def _reference_generate(model, tokenizer, prompts, **kwargs) -> list[list[int]]:
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, **kwargs)
    return out[:, enc["input_ids"].shape[1]:].tolist()


def _strip(tokens: list[int], eos: int) -> list[int]:
    """transformers pads a finished row with pad (= EOS here) up to max_new_tokens: keep up to the first EOS."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_adapters_moved(trained):
    model, _ = trained
    assert max(float(m.lam.detach().abs().max()) for m in model.adapters.values()) > 1e-2


@pytest.mark.parametrize("mode", ["merged", "factored"])
def test_onnx_prefill_logits_match_in_memory_model(trained, mode):
    model, root = trained
    predictor = Predictor.from_pretrained(root, mode=mode, provider="cpu")
    ids = [predictor.tokenizer(p)["input_ids"] for p in PROMPTS]
    from adalora_deploy.runtime.generate import left_pad, position_ids

    input_ids, mask = left_pad(ids, predictor.generator.pad_id)
    feeds = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids(mask),
             **predictor.generator._empty_past(len(ids))}
    got = predictor.session.run(feeds)["logits"]
    with torch.no_grad():
        want = model.model(**{k: torch.from_numpy(v) for k, v in feeds.items() if "past" not in k}).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(got[real] - want[real]).max() <= ATOL


@pytest.mark.parametrize("mode", ["merged", "factored"])
def test_greedy_generation_matches_transformers_token_for_token(trained, mode):
    model, root = trained
    predictor = Predictor.from_pretrained(root, mode=mode, provider="cpu")
    want = _reference_generate(model.model, predictor.tokenizer, PROMPTS)
    eos = predictor.tokenizer.eos_token_id
    got = predictor.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert [g["token_ids"] for g in got] == [_strip(w, eos) for w in want]
    assert all(g["finish_reason"] == ("eos" if eos in g["token_ids"] else "length") for g in got)
    recomputed = predictor.generate(PROMPTS, max_new_tokens=NEW_TOKENS, use_cache=False)
    assert [r["token_ids"] for r in recomputed] == [g["token_ids"] for g in got]


def test_manifest_records_prefill_and_decode_parity(trained):
    _, root = trained
    manifest = json.loads((root / "factored" / "adalora_manifest.json").read_text())
    assert manifest["task"] == "causal-lm"
    cases = manifest["validation"]["parity"]["onnx_vs_pytorch"]["cases"]
    assert {c["padding"] for c in cases} == {"left", "left, last 3 tokens after a past"}
    assert manifest["validation"]["cases"] == len(cases) == 8  # 4 cases x (prefill, decode)
    assert all(c["max_abs_diff"] <= ATOL for c in cases)


@pytest.mark.parametrize("mode", ["merged", "factored"])
def test_optimum_ortmodel_and_pipeline_generate(trained, mode):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer, pipeline

    model, root = trained
    ort_model = ORTModelForCausalLM.from_pretrained(root / mode)
    assert ort_model.use_cache
    tokenizer = AutoTokenizer.from_pretrained(root / mode)
    assert _reference_generate(ort_model, tokenizer, PROMPTS) == _reference_generate(model.model, tokenizer, PROMPTS)
    text = pipeline("text-generation", model=ort_model, tokenizer=tokenizer)(
        PROMPTS[0], max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith(PROMPTS[0])


def test_sampling_is_seeded_and_respects_top_p(trained):
    _, root = trained
    predictor = Predictor.from_pretrained(root, provider="cpu")
    a = predictor.generate(PROMPTS, max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9, seed=3)
    b = predictor.generate(PROMPTS, max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9, seed=3)
    assert a == b
    # top_p so small that only the most likely token survives: sampling is greedy decoding.
    tiny_p = predictor.generate(PROMPTS, max_new_tokens=8, do_sample=True, top_p=1e-9, seed=5)
    assert tiny_p == predictor.generate(PROMPTS, max_new_tokens=8)


def test_stream_events_add_up_to_generate(trained):
    _, root = trained
    predictor = Predictor.from_pretrained(root, provider="cpu")
    events = list(predictor.stream(PROMPTS, max_new_tokens=NEW_TOKENS))
    whole = predictor.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    for i, g in enumerate(whole):
        mine = [e for e in events if e["index"] == i]
        assert [e["token_id"] for e in mine] == g["token_ids"]
        assert "".join(e["text"] for e in mine) == g["text"]
        assert mine[-1]["finish_reason"] == g["finish_reason"]


# -- HTTP ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_server(tmp_path_factory):
    _, root = _train_and_export(tmp_path_factory.mktemp("lm-http"), "llama", prompt_rows())
    predictor = Predictor.from_pretrained(root, provider="cpu")
    config = ServerConfig(port=free_port(), max_texts=4, max_chars=200)
    with serving(create_app(predictor, config), config, timeout=60) as client:
        yield client, predictor


def test_http_generate_matches_predictor(lm_server):
    client, predictor = lm_server
    response = client.post("/v1/generate", json={"inputs": PROMPTS, "max_new_tokens": 12})
    assert response.status_code == 200
    assert response.json()["generations"] == predictor.generate(PROMPTS, max_new_tokens=12)


def test_http_stream_is_ndjson_token_by_token(lm_server):
    client, predictor = lm_server
    body = {"inputs": PROMPTS[0], "max_new_tokens": 10, "do_sample": True, "seed": 7, "top_p": 0.8, "stream": True}
    with client.stream("POST", "/v1/generate", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    want = predictor.generate(PROMPTS[0], max_new_tokens=10, do_sample=True, seed=7, top_p=0.8)
    assert lines[-1] == {"done": True, "generations": want}
    assert [e["token_id"] for e in lines[:-1]] == want[0]["token_ids"]


@pytest.mark.parametrize("body, status, words", [
    ({"inputs": "hi", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"inputs": "hi", "temperature": 0}, 422, "temperature"),
    ({"inputs": "hi", "top_p": 1.5}, 422, "top_p"),
    ({"inputs": "hi", "max_new_tokens": 2.5}, 422, "max_new_tokens"),
    ({"inputs": "hi", "beams": 4}, 422, "unknown keys"),
    ({"inputs": []}, 422, "inputs"),
    ({"inputs": ["a"] * 5}, 413, "at most 4"),
    ({"inputs": "hi", "max_new_tokens": 1000}, 422, "positions"),
    ({"inputs": "hi", "max_new_tokens": 1000, "stream": True}, 422, "positions"),  # before the stream starts
    ({"inputs": "hi", "stream": "yes"}, 422, "stream"),
    ({"inputs": "hi", "do_sample": 1}, 422, "true or false"),
    ({"inputs": "x" * 201}, 413, "at most 200"),
    ('{"inputs": "a \\ud800 b"}', 400, "lone surrogate"),  # raw JSON: the escape is valid JSON
])
def test_http_generate_refusals(lm_server, body, status, words):
    client, _ = lm_server
    response = client.post("/v1/generate", **({"content": body} if isinstance(body, str) else {"json": body}))
    assert response.status_code == status
    assert words in response.json()["error"]


def test_http_predict_refused_for_causal_lm(lm_server):
    client, _ = lm_server
    response = client.post("/v1/predict", json={"inputs": ["hi"]})
    assert response.status_code == 422 and "/v1/generate" in response.json()["error"]


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_train_and_export_causal_lm(tmp_path, capsys):
    base = save_tiny_decoder(tmp_path / "base", "llama")
    data = write_jsonl(tmp_path / "lm.jsonl", text_rows())
    assert main(["train", "--task", "causal-lm", "--model", str(base), "--data", str(data), "--steps", "4",
                 "--batch-size", "4", "--init-r", "4", "--target-r", "2", "--out", str(tmp_path / "ckpt")]) == 0
    assert json.loads((tmp_path / "ckpt" / "adalora_config.json").read_text())["task"] == "causal-lm"
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "onnx"), "--prune-ranks"]) == 0
    manifest = json.loads((tmp_path / "onnx" / "merged" / "adalora_manifest.json").read_text())
    assert manifest["optimized"] is False and "decoder with past key values" in manifest["fusion_skipped"]
    assert Predictor.from_pretrained(tmp_path / "onnx", provider="cpu").generate("red", max_new_tokens=3)


@pytest.mark.parametrize("argv, words", [
    (["--task", "causal-lm"], "needs its own --data"),
    (["--task", "translation", "--data", "x.jsonl"], "cannot be trained"),
])
def test_cli_train_refusals_are_one_line(tmp_path, capsys, argv, words):
    assert main(["train", *argv, "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and words in err and "\n" not in err


def test_causal_lm_rows_need_text_or_prompt_completion(tmp_path, capsys):
    base = save_tiny_decoder(tmp_path / "base", "llama")
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}] * 4)  # no completion
    assert main(["train", "--task", "causal-lm", "--model", str(base), "--data", str(data), "--steps", "2",
                 "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "'completion' is not a non-empty string" in err
    assert not (tmp_path / "ckpt").exists()


def test_rows_stop_at_eos_like_transformers(trained):
    """Take a token greedy decoding produces mid-way in row 0 as EOS: that row must stop there while
    the others go on, and the tokens must equal transformers' generate(eos_token_id=...)."""
    from adalora_deploy.runtime.generate import GenerationConfig, Generator

    model, root = trained
    predictor = Predictor.from_pretrained(root, provider="cpu")
    free = predictor.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    eos = free[0]["token_ids"][4]
    generator = Generator(predictor.session, {eos}, predictor.generator.pad_id)
    ids = [predictor.tokenizer(p)["input_ids"] for p in PROMPTS]
    got = generator.generate(ids, GenerationConfig(max_new_tokens=NEW_TOKENS))
    assert got[0]["finish_reason"] == "eos" and got[0]["token_ids"][-1] == eos and len(got[0]["token_ids"]) <= 5
    want = _reference_generate(model.model, predictor.tokenizer, PROMPTS, eos_token_id=eos)
    for g, w in zip(got, want, strict=True):
        assert g["token_ids"] == (w[: w.index(eos) + 1] if eos in w else w)


@pytest.mark.gpu
def test_cuda_session_generates_from_the_same_cache_graph(trained):
    """On a GPU: the CUDA provider's prefill logits agree with the CPU's (TF32 matmuls: loose atol) and
    generation runs through the cache on the device."""
    from adalora_deploy.runtime.generate import left_pad, position_ids

    _, root = trained
    cpu, gpu = (Predictor.from_pretrained(root, mode="factored", provider=p) for p in ("cpu", "cuda"))
    assert gpu.session.on_cuda
    ids, mask = left_pad([cpu.tokenizer(p)["input_ids"] for p in PROMPTS], cpu.generator.pad_id)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask),
             **cpu.generator._empty_past(len(PROMPTS))}
    real = mask.astype(bool)
    assert np.abs(gpu.session.run(feeds)["logits"][real] - cpu.session.run(feeds)["logits"][real]).max() <= 1e-2
    assert all(len(g["token_ids"]) >= 1 for g in gpu.generate(PROMPTS, max_new_tokens=NEW_TOKENS))


def test_bench_refuses_a_causal_lm_in_one_line(trained, tmp_path, capsys):
    _, root = trained
    for source in (root, root.parent / "ckpt"):
        assert main(["bench", str(source), "--json", str(tmp_path / "b.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "generate_bench.py" in err and "\n" not in err
    assert not (tmp_path / "b.json").exists()


def test_bound_cache_path_generates_the_same_tokens(trained):
    """The IOBinding path (the CUDA default, which keeps the cache on the device) run on CPU: the same
    greedy tokens as the plain path, with and without EOS handling."""
    from adalora_deploy.runtime.generate import GenerationConfig, Generator

    _, root = trained
    predictor = Predictor.from_pretrained(root, mode="factored", provider="cpu")
    ids = [predictor.tokenizer(p)["input_ids"] for p in PROMPTS]
    plain, bound = (Generator(predictor.session, predictor.generator.eos_ids, predictor.generator.pad_id, bind=b)
                    for b in (False, True))
    config = GenerationConfig(max_new_tokens=NEW_TOKENS)
    assert bound.generate(ids, config) == plain.generate(ids, config)
    sampled = GenerationConfig(max_new_tokens=8, do_sample=True, seed=2)
    assert bound.generate(ids, sampled) == plain.generate(ids, sampled)


def test_http_concurrent_generations_each_get_their_own_answer(lm_server):
    from concurrent.futures import ThreadPoolExecutor

    client, predictor = lm_server
    bodies = [{"inputs": p, "max_new_tokens": 6 + i} for i, p in enumerate(PROMPTS)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: client.post("/v1/generate", json=b), bodies))
    for body, response in zip(bodies, responses, strict=True):
        assert response.status_code == 200
        assert response.json()["generations"] == predictor.generate(body["inputs"], max_new_tokens=body["max_new_tokens"])


def test_http_stream_stops_generating_when_the_client_goes_away(trained):
    """A slowed-down real predictor: after the client reads one line and disconnects, the producer
    stops within a few tokens instead of running to max_new_tokens."""
    model, root = trained
    if model.model.config.model_type != "llama":
        pytest.skip("one decoder is enough for the server's cancellation")
    predictor = Predictor.from_pretrained(root, provider="cpu")
    produced = []
    real_stream = predictor.stream

    def slow_stream(*args, **kwargs):
        for event in real_stream(*args, **kwargs):
            produced.append(event)
            time.sleep(0.02)  # 80 tokens: 1.6 s if nothing stops the producer
            yield event

    predictor.stream = slow_stream
    config = ServerConfig(port=free_port())
    with serving(create_app(predictor, config), config) as client:
        with client.stream("POST", "/v1/generate", json={"inputs": "red", "max_new_tokens": 80, "stream": True}) as r:
            assert json.loads(next(r.iter_lines()))["index"] == 0
        time.sleep(2.5)
        assert len(produced) < 40, len(produced)



def _slowed(predictor, seconds_per_token: float = 0.02) -> list[list[dict]]:
    """Hold back each streamed token of the real predictor a little (so that a stream keeps the model
    thread busy); returns the list every completed generate() call is appended to."""
    finished = []
    real_stream, real_generate = predictor.stream, predictor.generate

    def slow_stream(*args, **kwargs):
        for event in real_stream(*args, **kwargs):
            time.sleep(seconds_per_token)
            yield event

    def recording_generate(*args, **kwargs):
        result = real_generate(*args, **kwargs)
        finished.append(result)
        return result

    predictor.stream, predictor.generate = slow_stream, recording_generate
    return finished


def test_http_generate_has_predicts_queue_bound_deadline_and_drop(trained):
    """/v1/generate shares /v1/predict's bounds: a full queue answers 503 with Retry-After, a generation
    still waiting at --request-timeout gets 504, and neither it nor one whose client gave up runs."""
    model, root = trained
    if model.model.config.model_type != "llama":
        pytest.skip("one decoder is enough for the server's bounds")
    predictor = Predictor.from_pretrained(root, provider="cpu")
    finished = _slowed(predictor)
    config = ServerConfig(port=free_port(), max_texts=2, max_queue_texts=2, request_timeout=0.5)
    holder_body = {"inputs": "red", "max_new_tokens": 80, "stream": True}  # ~1.6 s of the model thread

    async def scenario(url: str):
        async with httpx.AsyncClient(base_url=url, timeout=30) as ac:
            async def hold() -> list[str]:
                async with ac.stream("POST", "/v1/generate", json=holder_body) as r:
                    return [line async for line in r.aiter_lines()]

            holder = asyncio.create_task(hold())
            while (await ac.get("/health")).json()["queued_texts"] < 1:
                await asyncio.sleep(0.01)
            full = await ac.post("/v1/generate", json={"inputs": ["a", "b"], "max_new_tokens": 5})  # 1 + 2 > 2
            late = await ac.post("/v1/generate", json={"inputs": "c", "max_new_tokens": 5})  # waits behind the stream
            with pytest.raises(httpx.ReadTimeout):
                await ac.post("/v1/generate", json={"inputs": "d", "max_new_tokens": 5}, timeout=0.2)
            lines = await holder
            await asyncio.sleep(0.3)
            idle = (await ac.get("/health")).json()
            after = await ac.post("/v1/generate", json={"inputs": "e", "max_new_tokens": 5})
            return full, late, lines, idle, after

    with serving(create_app(predictor, config), config) as client:
        full, late, lines, idle, after = asyncio.run(scenario(str(client.base_url)))
    assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1 and "server busy" in full.json()["error"]
    assert late.status_code == 504 and "--request-timeout" in late.json()["error"]
    assert json.loads(lines[-1])["done"] is True  # the stream itself ran to its end
    assert idle["queued_texts"] == 0 and idle["queued_tokens"] == 0
    assert after.status_code == 200
    # Only the last request generated: the timed-out and the abandoned ones were dropped before running.
    assert finished == [after.json()["generations"]]
