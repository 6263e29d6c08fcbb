"""The stateful adapters' shared step: one Triton `execute()` batch through a per-call engine.

Kept free of Triton imports (the adapter passes its `pb_utils`), like `triton_params`.
"""

from __future__ import annotations

from typing import Any, Callable

from funchat.engines.sequences import SequenceError


def answer_batch(pb_utils, model: str, engine, metrics, parsed: list[tuple[int, Any]], responses: list,
                 outputs: Callable[[Any], list]) -> list:
    """Run the parsed requests [(index, LlmRequest | SrhRequest)] as one engine batch and fill
    `responses[index]`: a SequenceError answers its request alone (its status, e.g. NOT_FOUND),
    any other result becomes the response tensors `outputs(result)`."""
    batch = [r for _, r in parsed]
    with metrics.execute(len(batch), sum(r.start for r in batch), lambda: engine.pool.live):
        results = engine.run(batch)
    for (i, _), result in zip(parsed, results):
        if isinstance(result, SequenceError):
            code = getattr(pb_utils.TritonError, result.status, pb_utils.TritonError.INVALID_ARG)
            responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{model}: {result}", code))
        else:
            responses[i] = pb_utils.InferenceResponse(outputs(result))
    return responses
