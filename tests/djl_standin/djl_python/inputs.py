"""A request as the Python engine hands it to ``handle``, as ``djl_python.inputs.Input``.

``properties``: the HTTP headers of a request (looked up case-insensitively), or at model load
the ``option.*`` settings of serving.properties (prefix removed) plus ``model_dir``.
``content``: the body under the key "data", as a bytearray (the engine reads it off a socket).
"""

from __future__ import annotations

import json
from typing import Any

from .pair_list import PairList


class Input:
    def __init__(self) -> None:
        self.function_name: str | None = None
        self.properties: dict[str, str] = {}
        self.content = PairList()

    def is_batch(self) -> bool:
        return "batch_size" in self.properties

    def get_batch_size(self) -> int:
        return int(self.properties.get("batch_size", "1"))

    def get_batches(self) -> list[Input]:
        if not self.is_batch():
            return [self]
        batch = [Input() for _ in range(self.get_batch_size())]
        for key, value in self.properties.items():
            if key.startswith("batch_") and key != "batch_size":  # batch_001_<key>
                batch[int(key[6:9])].properties[key[10:]] = value
        for i in range(self.content.size()):
            key = self.content.key_at(i)
            batch[int(key[6:9])].content.add(key[10:], self.content.value_at(i))
        return batch

    def get_function_name(self) -> str | None:
        return self.function_name

    def get_properties(self) -> dict[str, str]:
        return self.properties

    def get_content(self) -> PairList:
        return self.content

    def get_property(self, key: str) -> str | None:
        return next((v for k, v in self.properties.items() if k.lower() == key.lower()), None)

    def contains_key(self, key: str) -> bool:
        return self.content.get(key) is not None

    def get_as_bytes(self, key: str | None = None) -> Any:
        if self.content.is_empty():
            return None
        if key:
            found = self.content.get(key)
            if found is None:
                raise KeyError(f"requested data for key:{key} is not found!")
            return found
        found = self.content.get("data")
        return self.content.value_at(0) if found is None else found

    def get_as_string(self, key: str | None = None) -> str:
        return self.get_as_bytes(key=key).decode("utf-8")

    def get_as_json(self, key: str | None = None) -> Any:
        return json.loads(self.get_as_bytes(key=key).decode("utf-8"))

    def is_empty(self) -> bool:
        return self.content.is_empty()
