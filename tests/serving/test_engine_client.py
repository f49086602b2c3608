"""The engine contract's data: what crosses Ray Serve between a Router replica and the Ingress (pickled)."""

from __future__ import annotations

import pickle

from serving.engine_client import RequestOutput, TokenLogprobs


def test_a_request_output_with_prompt_logprobs_survives_pickling_unchanged():
    out = RequestOutput(
        request_id="r", new_token_ids=[], new_text="", new_logprobs=[], finished=True, finish_reason="length",
        num_prompt_tokens=2, num_output_tokens=0,
        prompt_logprobs=[None, TokenLogprobs(token_id=7, logprob=-1.5, top=((3, -0.2),), rank=2)],
    )  # fmt: skip
    assert pickle.loads(pickle.dumps(out)) == out
