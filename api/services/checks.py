"""Request checks every surface shares: the served model's shape and the token limits, refused with the
field at fault before any model work."""

from __future__ import annotations

from api.services.ports import Serving
from infrastructure.errors import InvalidRequestError, TokenLimitError
from infrastructure.steering.resolve import ModelShape


def model_shape(runtime: Serving) -> ModelShape:
    return ModelShape(runtime.loaded.hidden_size, runtime.loaded.n_layers)


def check_new_tokens(runtime: Serving, value: int, param: str) -> int:
    limit = runtime.settings.max_new_tokens_limit
    if value > limit:
        raise InvalidRequestError(f"{value} new tokens exceed the limit of {limit} (MAX_NEW_TOKENS_LIMIT)", param)
    return value


def check_prompt_tokens(runtime: Serving, n_tokens: int, param: str = "prompt") -> None:
    limit = runtime.settings.token_limit
    if n_tokens > limit:
        raise TokenLimitError(f"Text too long: {n_tokens} tokens, max is {limit} (TOKEN_LIMIT)", param)
    runtime.require_engine().check_prompt(n_tokens, param)
