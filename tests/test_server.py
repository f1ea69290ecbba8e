"""``mlx_llama3v.server`` through the official ``openai`` client, on a free loopback port.

Tiny converted models of each family (``test_generate.Tiny``) are served in-process
(one server per family for the whole module); the client's greedy answers, whole and
streamed, must be the text ``generate`` gives for the same messages. Then images by
data URL and by a URL on a local ``http.server``, a follow-up turn served from the
prefix KV cache, every error status through the client's exception types, 8 clients x
5 requests at once, a client that disconnects mid-stream, and the command line.
"""

import base64
import http.client
import http.server
import io
import json
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from mlx_llama3v import generate
from mlx_llama3v.generation.features import feature_cache
from mlx_llama3v.server import serve
from test_generate import FAMILIES, IMAGE_A, IMAGE_B, QUESTIONS, Tiny

N = 10
MAX_BODY = 256 * 1024


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def openai_user(question, urls=()):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"role": "user", "content": parts + [{"type": "text", "text": question}]}


def our_user(question, images=()):
    parts = [{"type": "image", "image": im} for im in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": question}]}


class Servers:
    """A server per family, started on first use; stopped at the end of the module."""

    def __init__(self, root: Path):
        self.tiny = Tiny(root)
        self.running = {}

    def get(self, family, **options):
        key = (family, tuple(sorted(options.items())))
        if key not in self.running:
            _, out, model, processor = self.tiny.get(family)
            options.setdefault("max_body_bytes", MAX_BODY)
            server = serve(model, processor, "tiny-" + family, port=0, **options)
            client = openai.OpenAI(
                base_url=server.url + "/v1",
                api_key=options.get("api_key") or "none",
                max_retries=0,
                timeout=120,
            )
            self.running[key] = (server, client, model, processor)
        return self.running[key]

    def close(self):
        for server, *_ in self.running.values():
            server.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    s = Servers(tmp_path_factory.mktemp("server"))
    yield s
    s.close()


@pytest.fixture
def minicpm(servers):
    return servers.get("minicpm_v2_5")


def ask(client, family, messages, **kwargs):
    return client.chat.completions.create(model="tiny-" + family, messages=messages, **kwargs)


def streamed(client, family, messages, **kwargs):
    pieces, finish, usage = [], None, None
    stream = ask(
        client, family, messages, stream=True, stream_options={"include_usage": True}, **kwargs
    )
    for event in stream:
        if event.usage is not None:
            usage = event.usage
        for choice in event.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(pieces), finish, usage


# ------------------------------------------------------------------ answers equal generate's
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_answers_whole_and_streamed_equal_generate(servers, family):
    server, client, model, processor = servers.get(family)
    question = QUESTIONS[0]
    expected = generate(model, processor, [our_user(question, [IMAGE_A])], max_tokens=N)
    messages = [openai_user(question, [data_url(IMAGE_A)])]

    whole = ask(client, family, messages, max_tokens=N, temperature=0)
    assert whole.choices[0].message.content == expected.text
    assert whole.choices[0].finish_reason == expected.finish_reason
    assert whole.model == "tiny-" + family
    prompt_tokens = len(processor([our_user(question, [IMAGE_A])]).input_ids)
    assert whole.usage.prompt_tokens == prompt_tokens
    assert whole.usage.completion_tokens == len(expected.tokens)
    assert whole.usage.total_tokens == prompt_tokens + len(expected.tokens)

    text, finish, usage = streamed(client, family, messages, max_completion_tokens=N, temperature=0)
    assert text == expected.text
    assert finish == expected.finish_reason
    assert usage.prompt_tokens == prompt_tokens and usage.completion_tokens == len(expected.tokens)


def test_system_message_two_images_and_text_only(minicpm):
    server, client, model, processor = minicpm
    family = "minicpm_v2_5"
    ours = [
        {"role": "system", "content": "Answer briefly."},
        our_user("Compare the pictures.", [IMAGE_A, IMAGE_B]),
    ]
    theirs = [
        {"role": "system", "content": "Answer briefly."},
        openai_user("Compare the pictures.", [data_url(IMAGE_A), data_url(IMAGE_B)]),
    ]
    expected = generate(model, processor, ours, max_tokens=N).text
    assert (
        ask(client, family, theirs, max_tokens=N, temperature=0).choices[0].message.content
        == expected
    )
    text_only = [{"role": "user", "content": "Tell me a story."}]
    expected = generate(model, processor, text_only, max_tokens=N).text
    assert (
        ask(client, family, text_only, max_tokens=N, temperature=0).choices[0].message.content
        == expected
    )


def test_stop_strings_and_finish_reasons(minicpm):
    server, client, model, processor = minicpm
    family = "minicpm_v2_5"
    messages = [our_user(QUESTIONS[1], [IMAGE_A])]
    full = generate(model, processor, messages, max_tokens=N).text
    stop = full[3:5]
    expected = generate(model, processor, messages, max_tokens=N, stop=[stop])
    request = [openai_user(QUESTIONS[1], [data_url(IMAGE_A)])]
    answer = ask(client, family, request, max_tokens=N, temperature=0, stop=stop)
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].finish_reason == "stop"
    text, finish, _ = streamed(client, family, request, max_tokens=N, temperature=0, stop=[stop])
    assert (text, finish) == (expected.text, "stop")
    assert (
        ask(client, family, request, max_tokens=2, temperature=0).choices[0].finish_reason
        == "length"
    )


def test_seeded_sampling_repeats(minicpm):
    server, client, *_ = minicpm
    request = [openai_user(QUESTIONS[2])]
    kwargs = dict(max_tokens=N, temperature=1.0, top_p=0.9, seed=7)
    first = ask(client, "minicpm_v2_5", request, **kwargs).choices[0].message.content
    again = ask(client, "minicpm_v2_5", request, **kwargs).choices[0].message.content
    assert first == again
    extensions = dict(top_k=5, min_p=0.05, repetition_penalty=1.1)
    answer = ask(client, "minicpm_v2_5", request, extra_body=extensions, **kwargs)
    assert answer.choices[0].finish_reason in ("stop", "length")


class _Images(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    (root / "a.png").write_bytes(png(IMAGE_A))
    (root / "big.png").write_bytes(png(Image.fromarray(np.zeros((4000, 4000, 3), np.uint8))))
    (root / "not-an-image.png").write_bytes(b"hello")
    handler = lambda *a, **k: _Images(*a, directory=str(root), **k)  # noqa: E731
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()
    site.server_close()


def test_image_by_url_from_a_local_http_server(minicpm, image_site):
    server, client, model, processor = minicpm
    expected = generate(model, processor, [our_user(QUESTIONS[0], [IMAGE_A])], max_tokens=N).text
    answer = ask(
        client,
        "minicpm_v2_5",
        [openai_user(QUESTIONS[0], [image_site + "/a.png"])],
        max_tokens=N,
        temperature=0,
    )
    assert answer.choices[0].message.content == expected


def test_a_follow_up_turn_prefills_only_its_new_tokens(minicpm):
    server, client, model, processor = minicpm
    family = "minicpm_v2_5"
    server.engine.prefix_cache.clear()
    feature_cache(model).clear()
    first_q = [openai_user("Describe this one.", [data_url(IMAGE_B)])]
    first = ask(client, family, first_q, max_tokens=N, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    answer = first.choices[0].message.content
    follow = first_q + [{"role": "assistant", "content": answer}, openai_user("And the colours?")]
    second = ask(client, family, follow, max_tokens=N, temperature=0)
    ours = [
        our_user("Describe this one.", [IMAGE_B]),
        {"role": "assistant", "content": answer},
        our_user("And the colours?"),
    ]
    assert second.choices[0].message.content == generate(model, processor, ours, max_tokens=N).text
    cached = second.usage.prompt_tokens_details.cached_tokens
    first_prompt = first.usage.prompt_tokens
    assert cached >= first_prompt  # the whole first turn (and part of the answer) was reused
    assert second.usage.prompt_tokens - cached < second.usage.prompt_tokens - first_prompt + 1


# ------------------------------------------------------------------ errors
def test_errors_come_in_openai_shape_with_the_right_status(servers, minicpm, image_site, tmp_path):
    server, client, *_ = minicpm
    family = "minicpm_v2_5"
    fine = [openai_user("Hi")]

    def bad_request(messages=fine, match=None, **kwargs):
        with pytest.raises(openai.BadRequestError, match=match) as info:
            ask(client, family, messages, max_tokens=N, **kwargs)
        assert info.value.status_code == 400
        assert info.value.body[
            "message"
        ]  # OpenAI's {"error": {"message", "type", "param", "code"}}
        return info.value

    e = bad_request(
        [openai_user("Hi", ["data:image/png;base64,bm90IGFuIGltYWdl"])], "not a recognised image"
    )
    assert e.code == "invalid_image" and e.param == "messages[0].content[0].image_url"
    bad_request([openai_user("Hi", ["data:image/png;base64,%%%"])], "not valid base64")
    bad_request([openai_user("Hi", [image_site + "/not-an-image.png"])], "not a recognised image")
    bad_request([openai_user("Hi", [image_site + "/missing.png"])], "HTTP 404")
    bad_request([openai_user("Hi", [str(tmp_path / "x.png")])], "local image paths are not allowed")
    assert bad_request(temperature=5).param == "temperature"
    assert bad_request(top_p=0).param == "top_p"
    assert bad_request(extra_body={"top_k": -1}).param == "top_k"
    bad_request(extra_body={"max_tokens": 0}, match="max_tokens")
    bad_request(n=2, match="n=1")
    bad_request([{"role": "robot", "content": "Hi"}], "role")
    bad_request([{"role": "user", "content": [{"type": "audio"}]}], "unsupported content part")
    e = bad_request([openai_user("word " * 3000)], "more than the model's context")
    assert e.code == "context_length_exceeded"

    with pytest.raises(openai.NotFoundError, match="does not exist") as info:
        client.chat.completions.create(model="gpt-4o", messages=fine)
    assert info.value.code == "model_not_found"

    with pytest.raises(openai.APIStatusError) as info:  # the body limit of the test servers
        ask(
            client,
            family,
            [
                openai_user(
                    "Hi",
                    [
                        data_url(
                            Image.fromarray(
                                np.random.default_rng(0).integers(0, 256, (400, 400, 3), np.uint8)
                            )
                        )
                    ],
                )
            ],
        )
    assert info.value.status_code == 413 and info.value.code == "request_too_large"

    locked, locked_client, *_ = servers.get(family, api_key="secret")
    assert ask(locked_client, family, fine, max_tokens=2).choices[0].finish_reason
    intruder = openai.OpenAI(base_url=locked.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        ask(intruder, family, fine, max_tokens=2)
    assert info.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        intruder.models.list()

    # the server still answers after all that
    assert ask(client, family, fine, max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_models_health_and_the_chat_page(minicpm):
    server, client, *_ = minicpm
    assert [m.id for m in client.models.list().data] == ["tiny-minicpm_v2_5"]
    health = json.loads(urlopen(server.url + "/health"))
    assert health["status"] == "ok" and health["model"] == "tiny-minicpm_v2_5"
    page = urlopen(server.url + "/").decode()
    assert "<textarea" in page and "/static/app.js" in page
    for name in ("app.js", "app.css"):
        assert urlopen(f"{server.url}/static/{name}")
    assert not re.search(r"(src|href)=\"https?://", page)  # works offline: nothing from a CDN
    with pytest.raises(Exception, match="404"):
        urlopen(server.url + "/static/../app.py")


def urlopen(url):
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


# ------------------------------------------------------------------ several clients at once
def test_eight_clients_five_requests_each_none_mixed_up(minicpm):
    server, client, model, processor = minicpm
    family = "minicpm_v2_5"
    cases = []
    for i in range(8):
        question = QUESTIONS[i % 3] + " " * (i // 3)
        images = [[IMAGE_A], [IMAGE_B], []][i % 3]
        cases.append((question, images, 4 + i % 5))
    expected = [
        generate(model, processor, [our_user(q, ims)], max_tokens=n).text for q, ims, n in cases
    ]
    peak = [0]

    def client_run(i):
        question, images, n = cases[i]
        messages = [openai_user(question, [data_url(im) for im in images])]
        texts = []
        for r in range(5):
            if r % 2:
                text, _, _ = streamed(client, family, messages, max_tokens=n, temperature=0)
            else:
                text = (
                    ask(client, family, messages, max_tokens=n, temperature=0)
                    .choices[0]
                    .message.content
                )
            peak[0] = max(peak[0], server.engine.stats()["running"])
            texts.append(text)
        return texts

    tic = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(client_run, range(8)))
    assert time.perf_counter() - tic < 240
    for i, texts in enumerate(results):
        assert texts == [expected[i]] * 5, f"client {i}"
    assert peak[0] > 1  # decoded together, not one after another


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_client_that_disconnects_mid_answer_frees_its_slot(minicpm, stream):
    server, client, *_ = minicpm
    host, port = server.httpd.server_address[:2]
    body = json.dumps(
        {
            "model": "tiny-minicpm_v2_5",
            "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "stream": stream,
            "max_tokens": 1900,  # about 8 s of answer, alone on 2 cores
            "temperature": 0,
        }
    )
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    if stream:
        response = connection.getresponse()
        assert response.status == 200
        response.fp.readline()  # the first event has come: the request is in the batch
    deadline = time.monotonic() + 30
    while server.engine.stats()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.engine.stats()["running"] == 1
    connection.sock.shutdown(2)
    connection.close()
    deadline = time.monotonic() + 1.5
    while server.engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.engine.stats() == {
        **server.engine.stats(),
        "running": 0,
        "prefilling": 0,
        "waiting": 0,
    }
    answer = ask(client, "minicpm_v2_5", [openai_user("Hi")], max_tokens=3, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")


# ------------------------------------------------------------------ the command line
def run_server(*args, timeout=60, command=("mlx_llama3v.server",)):
    return subprocess.run(
        [sys.executable, "-m", *command, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_command_line_bad_input_is_one_error_line(tmp_path):
    for args, fragment in [
        (["--model", str(tmp_path / "missing")], "model folder not found"),
        (["--model", str(tmp_path), "--port", "70000"], "--port is out of range"),
        (["--model", str(tmp_path), "--max-batch", "0"], "--max-batch is out of range"),
    ]:
        result = run_server(*args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    result = run_server("--model", str(tmp_path / "missing"), command=("mlx_llama3v", "server"))
    assert result.returncode == 2 and "model folder not found" in result.stderr


def test_command_line_serves(servers, tmp_path):
    _, out, _, _ = servers.tiny.get("minicpm_v2_5")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_llama3v.server",
            "--model",
            str(out),
            "--port",
            "0",
            "--api-key",
            "k",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stderr.readline()
        url = re.search(r"on (http://\S+) ", line).group(1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [str(out)]
        answer = client.chat.completions.create(
            model=out.name, messages=[openai_user("Hi")], max_tokens=3, temperature=0
        )
        assert answer.choices[0].finish_reason in ("stop", "length")
    finally:
        process.terminate()
        process.wait(timeout=30)


# ------------------------------------------------------------------ the prefix cache
def test_the_prefix_cache_hands_out_its_entry_or_a_trimmed_copy_and_stays_bounded(minicpm):
    import mlx.core as mx

    from mlx_llama3v.server.prefix_cache import PrefixCache, cache_nbytes, from_layers
    from mlx_llama3v.generation.prompt_cache import PromptCache

    _, _, model, _ = minicpm

    def filled(keys):
        cache = PromptCache(model)
        model.language_model(mx.array([list(range(1, len(keys) + 1))]), cache=cache.layers)
        mx.eval([c.state for c in cache.layers])
        return from_layers(model, cache.layers, keys)

    store = PrefixCache(model)
    conversation = filled(list("abcdef"))
    store.put(conversation)
    assert store.take(list("xyz")).offset == 0  # nothing shared: a new cache
    copy = store.take(list("abcxyz"))  # shares a prefix of the entry: a copy, the entry stays
    assert copy is not conversation and copy.keys == list("abc") and copy.offset == 3
    assert len(store) == 1 and conversation.offset == 6
    follow_up = store.take(list("abcdefgh"))  # the next turn: the entry itself, taken out
    assert follow_up is conversation and len(store) == 0
    assert follow_up.reuse(list("abcdefgh")) == 6

    one = cache_nbytes(filled(list("abcdef")))
    small = PrefixCache(model, max_bytes=2 * one)
    for word in ("abcdef", "ghijkl", "mnopqr"):
        small.put(filled(list(word)))
    assert len(small) == 2 and small.nbytes <= 2 * one
    assert small.take(list("abcdef")).offset == 0  # the oldest went first


def test_a_fault_of_ours_is_a_500_in_one_line_and_the_server_goes_on(minicpm, monkeypatch, capfd):
    server, client, *_ = minicpm

    def broken(messages):
        raise RuntimeError("the processor broke")

    monkeypatch.setattr(server, "processor", broken)
    with pytest.raises(openai.InternalServerError, match="the processor broke"):
        ask(client, "minicpm_v2_5", [openai_user("Hi")], max_tokens=2)
    monkeypatch.undo()
    assert ask(client, "minicpm_v2_5", [openai_user("Hi")], max_tokens=2).choices[0].finish_reason
    err = capfd.readouterr().err
    assert "Traceback" not in err and "RuntimeError: the processor broke" in err


def test_a_client_resetting_its_connection_prints_no_traceback(minicpm, capfd):
    import socket
    import struct

    server, client, *_ = minicpm
    host, port = server.httpd.server_address[:2]
    for _ in range(3):  # an idle keep-alive connection the client drops with a reset
        s = socket.create_connection((host, port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        s.recv(4096)
        s.close()
    assert ask(client, "minicpm_v2_5", [openai_user("Hi")], max_tokens=2).choices[0].finish_reason
    assert "Traceback" not in capfd.readouterr().err
