"""The serving stream: mixed decode and prefill requests, reproducible."""

from moeflux.bench.serve import DECODE_SIZES, request_stream


def test_stream_mixes_decode_steps_and_prefills_and_is_reproducible():
    stream = request_stream(200, max_tokens=4096, seed=1)
    assert stream == request_stream(200, max_tokens=4096, seed=1)
    kinds = [kind for kind, _ in stream]
    assert 100 < kinds.count("decode") < 190 and kinds.count("prefill") > 10
    assert all(tokens in DECODE_SIZES for kind, tokens in stream if kind == "decode")
    assert all(256 <= tokens <= 4096 for kind, tokens in stream if kind == "prefill")


def test_prefills_fit_the_largest_shape():
    stream = request_stream(50, max_tokens=300)
    assert max(tokens for _, tokens in stream) <= 300
    assert {tokens for kind, tokens in request_stream(50, max_tokens=40) if kind == "prefill"} == {40}
