"""The OpenAPI 3.1 description of `xm serve`, served at GET /openapi.json: clip back's endpoints
(the fields ClipClient sends, the answers it reads) and xm's. Written out rather than derived
from code, since the endpoints take clip back's loosely typed JSON (checked in `service.py`)."""

from __future__ import annotations

from typing import Any

ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": "refused: one line saying why", **_json(ERROR)} for c in codes}


def openapi(service: Any = None) -> dict[str, Any]:
    indices = service.indices_list() if service is not None else []
    name = {"type": "string", "description": "a served indice (default: the first)", **({"enum": indices} if indices else {})}
    knn_request = {
        "type": "object",
        "description": "clip back's query; exactly one of text, image, image_url, embedding_input",
        "properties": {
            "text": {"type": ["string", "null"], "maxLength": 4096},
            "image": {"type": ["string", "null"], "description": "base64 image (or a data: URL)"},
            "image_url": {"type": ["string", "null"], "description": "fetched only with --allow-url-fetch"},
            "embedding_input": {"type": ["array", "null"], "items": {"type": "number"}},
            "modality": {"type": "string", "enum": ["image", "text"], "default": "image",
                         "description": "which kNN index is searched"},
            "num_images": {"type": "integer", "minimum": 1, "default": 40, "description": "results with metadata"},
            "num_result_ids": {"type": "integer", "minimum": 1, "description": "results in all (the rest: id and similarity)"},
            "indice_name": name,
            "deduplicate": {"type": "boolean", "default": False},
            "use_safety_model": {"type": "boolean", "default": False,
                                 "description": "drops results the memory's NSFW/punsafe column flags"},
            "use_violence_detector": {"type": "boolean", "default": False,
                                      "description": "clip back's prompt-embedding detector (--violence-prompts)"},
            "use_mclip": {"type": "boolean", "default": False, "description": "never honoured"},
            "aesthetic_score": {"type": ["number", "string", "null"], "description": "never honoured"},
            "aesthetic_weight": {"type": ["number", "string", "null"]},
        },
    }
    knn_result = {"type": "object", "properties": {"id": {"type": "integer"}, "similarity": {"type": "number"}},
                  "required": ["id", "similarity"], "additionalProperties": True,
                  "description": "the metadata columns (caption, url, image_path, ...) then id and similarity"}
    classify_request = {
        "type": "object",
        "properties": {
            "image": {"type": "string", "description": "base64 image"},
            "images": {"type": "array", "items": {"type": "string"}, "maxItems": 16},
            "labels": {"oneOf": [{"type": "array", "items": {"type": "string", "maxLength": 200}, "minItems": 2},
                                 {"type": "string", "description": "a labels file's text"}]},
            "method": {"type": "string", "default": "xmore", "description": "see GET /xm/methods"},
            "model": {"type": "string"},
            "templates": {"type": "array", "items": {"type": "string", "description": "exactly one {}"}, "maxItems": 32},
            "protocol": {"type": "string", "enum": ["authors", "xm"]},
            "explain": {"type": "boolean", "default": True},
            "stream": {"oneOf": [{"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"}, {"type": "boolean"}]},
            "indice_name": name,
            "options": {"type": "object", "description": "method options (also accepted at the top level)"},
        },
        "required": ["labels"],
        "additionalProperties": True,
    }
    unhonoured = {"X-XM-Unhonoured-Options": {"schema": {"type": "string"},
                                              "description": "the asked-for filters this memory cannot honour, or none"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "xm serve", "version": "1",
                 "description": "clip-retrieval's clip back API over xm memories, plus /classify"},
        "components": {
            "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "string"}, "status": {"type": "integer"}},
                                  "required": ["error", "status"]}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/knn-service": {"post": {
                "summary": "clip back's kNN search", "requestBody": {"required": True, **_json(knn_request)},
                "responses": {"200": {"description": "results, best first", "headers": unhonoured,
                                      **_json({"type": "array", "items": knn_result})},
                              **_errors(400, 403, 404, 411, 413, 503)}}},
            "/metadata": {"post": {
                "summary": "clip back's metadata of ids",
                "requestBody": {"required": True, **_json({"type": "object", "required": ["ids"], "properties": {
                    "ids": {"type": "array", "items": {"type": "integer"}}, "indice_name": name}})},
                "responses": {"200": {"description": "one entry per id, in order", **_json({"type": "array", "items": {
                    "type": "object", "properties": {"id": {"type": "integer"}, "metadata": {"type": "object"}}}})},
                    **_errors(400, 404, 413)}}},
            "/indices-list": {"get": {"summary": "clip back's served indices",
                                      "responses": {"200": {"description": "names", **_json({"type": "array", "items": {"type": "string"}})}}}},
            "/classify": {"post": {
                "summary": "classify images with any method (what `xm classify --json` prints)",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": classify_request},
                    "multipart/form-data": {"schema": {"type": "object", "properties": {
                        "image": {"type": "string", "format": "binary"}, "labels": {"type": "string"},
                        "method": {"type": "string"}, "templates": {"type": "string"}}}}}},
                "responses": {"200": {"description": "a result, or a list of them for `images`",
                                      **_json({"type": ["object", "array"]})}, **_errors(400, 403, 409, 411, 413, 503)}}},
            "/healthz": {"get": {"summary": "liveness; never waits for a compute slot", "security": [],
                                 "responses": {"200": {"description": "ok", **_json({"type": "object"})}}}},
            "/metrics": {"get": {"summary": "Prometheus text", "responses": {"200": {"description": "metrics"}}}},
            "/xm/indices": {"get": {"summary": "roles, counts, encoders, filters of each indice",
                                    "responses": {"200": {"description": "by name", **_json({"type": "object"})}}}},
            "/xm/methods": {"get": {"summary": "methods and their options",
                                    "responses": {"200": {"description": "list", **_json({"type": "array"})}}}},
            "/xm/image/{indice}/{id}": {"get": {
                "summary": "a memory item's local source image",
                "parameters": [{"name": "indice", "in": "path", "required": True, "schema": {"type": "string"}},
                               {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}],
                "responses": {"200": {"description": "the image"}, **_errors(404, 413)}}},
        },
        "security": [{"bearer": []}, {}],
    }
