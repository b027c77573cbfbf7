"""POST/GET/DELETE /api/v1/vectors: the vector registry (JSON floats or a control-vector file upload)."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from api.deps import RuntimeDep
from api.routing import JSONRoute, stdlib_json
from api.schemas.common import ERROR_RESPONSES
from api.schemas.vectors import (
    RegistryOptions,
    VectorCreateRequest,
    VectorDeleted,
    VectorDetail,
    VectorList,
    json_example,
)
from api.services.vectors import (
    create_from_file,
    create_from_json,
    delete_vector,
    list_vectors,
    parse_upload,
    vector_detail,
)
from infrastructure.errors import InvalidJSONError, InvalidRequestError

router = APIRouter(route_class=JSONRoute, prefix="/api/v1", tags=["Vector registry"], responses=ERROR_RESPONSES)

# Every field has an example or a default, because Swagger UI's form sends a sample for the others (0 for
# an integer, which would name a layer the file may lack). A form field is text, and default_layer is
# documented as the digits it carries; an empty field means "not given" (see _form_fields).
_UPLOAD_SCHEMA = {
    "type": "object",
    "required": ["name", "file"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9_-]{1,64}$", "example": "my-control-vector"},
        "file": {"type": "string", "format": "binary", "description": "GGUF (llama.cpp, repeng) or safetensors"},
        "description": {"type": "string", "default": ""},
        "default_layer": {
            "type": "string",
            "pattern": "^([0-9]+)?$",
            "default": "",
            "description": "A layer of the file used when a request names none; empty: the middle one of its layers.",
        },
        "persist": {"type": "boolean", "default": False},
        "overwrite": {"type": "boolean", "default": False},
    },
}
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": VectorCreateRequest.model_json_schema(), "example": json_example()},
            "multipart/form-data": {"schema": _UPLOAD_SCHEMA},
        },
    }
}


def _form_fields(form) -> dict[str, str]:
    """The form's fields but the file; an empty field is not given (HTML and Swagger UI send untouched inputs empty)."""
    return {k: v for k, v in form.multi_items() if k != "file" and v != ""}


def _validated(model: type[RegistryOptions], data: object) -> RegistryOptions:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from exc


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """JSON objects with a repeated key are refused: `{"10": a, "10": b}` must not silently keep b."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise json.JSONDecodeError(f"duplicate key {key[:40]!r}", "", 0)
        seen[key] = value
    return seen


async def _json_body(request: Request) -> object:
    """The registration body, parsed off the event loop (a few MB of floats) with duplicate keys refused."""
    body = await request.body()
    try:
        return await asyncio.to_thread(stdlib_json, body, _unique_keys)
    except ValueError as exc:
        raise InvalidJSONError(f"malformed JSON: {exc}") from exc


async def _upload(request: Request, runtime: RuntimeDep) -> VectorDetail:
    form = await request.form()
    fields = _form_fields(form)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise InvalidRequestError("attach the control-vector file as the form field 'file'", "file")
    opts = _validated(RegistryOptions, fields)
    limit = runtime.settings.registry_max_file_bytes
    if upload.size is not None and upload.size > limit:
        raise InvalidRequestError(
            f"the file has {upload.size} bytes; at most {limit} (REGISTRY_MAX_FILE_BYTES)", "file"
        )
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise InvalidRequestError(f"the file exceeds {limit} bytes (REGISTRY_MAX_FILE_BYTES)", "file")
    parsed = await asyncio.to_thread(parse_upload, runtime, data)  # parsing never blocks other clients
    return create_from_file(runtime, opts, parsed, upload.filename)


@router.post(
    "/vectors",
    response_model=VectorDetail,
    status_code=201,
    summary="Register a steering vector (JSON floats, or a GGUF / safetensors control-vector upload)",
    openapi_extra=_BODY,
)
async def create(request: Request, runtime: RuntimeDep) -> VectorDetail:
    """JSON floats, or a multipart upload of a control-vector file, depending on the Content-Type."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        return await _upload(request, runtime)
    payload = await _json_body(request)
    body = await asyncio.to_thread(_validated, VectorCreateRequest, payload)
    return create_from_json(runtime, body)


@router.get("/vectors", response_model=VectorList, summary="List the registered vectors")
async def vectors(runtime: RuntimeDep) -> VectorList:
    return list_vectors(runtime)


@router.get("/vectors/{name}", response_model=VectorDetail, summary="One registered vector or shipped trait")
async def vector(
    name: str,
    runtime: RuntimeDep,
    values: bool = Query(False, description="Include the floats."),
    layer: int | None = Query(None, ge=0, description="With values: only this layer."),
) -> VectorDetail:
    return vector_detail(runtime, name, values, layer)


@router.delete("/vectors/{name}", response_model=VectorDeleted, summary="Remove a registered vector")
async def delete(name: str, runtime: RuntimeDep) -> VectorDeleted:
    return delete_vector(runtime, name)
