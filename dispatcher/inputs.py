"""Init images, masks and the job's own LoRA files: uploaded to the job's store at submission,
so messages carry keys.

A local path in the spec becomes `store:<job>/inputs/<sha256>.<ext>`; a `store:` key
already in the spec is checked to exist. Workers read both from the store.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from farm import keys
from farm.errors import SpecError
from farm.spec import STORE_PREFIX, JobSpec
from farm.store import Store, check_key


def upload_inputs(spec: JobSpec, store: Store, job_id: str) -> JobSpec:
    if spec.mode == "txt2img" and not spec.loras:
        return spec
    uploaded: dict[str, str] = {}

    def place(ref: str, field: str) -> str:
        if ref.startswith(STORE_PREFIX):
            key = ref[len(STORE_PREFIX):]
            try:
                check_key(key)
            except ValueError as e:
                raise SpecError.single(field, str(e)) from None
            if not store.exists(key):
                raise SpecError.single(field, f"no object {key!r} in the store {store.url}")
            return ref
        if ref not in uploaded:
            data = Path(ref).read_bytes()
            key = keys.job_input(job_id, hashlib.sha256(data).hexdigest()[:32], Path(ref).suffix.lower() or ".png")
            store.put(key, data, "image/png" if key.endswith(".png") else "application/octet-stream")
            uploaded[ref] = STORE_PREFIX + key
        return uploaded[ref]

    changes: dict = {}
    if spec.loras:
        changes["loras"] = {name: place(ref, f"loras.{name}") for name, ref in spec.loras.items()}
    if spec.mode == "txt2img":
        return spec.model_copy(update=changes)
    if isinstance(spec.init_image, str):
        changes["init_image"] = place(spec.init_image, "init_image")
    else:
        changes["init_image"] = [place(r, f"init_image[{i}]") for i, r in enumerate(spec.init_images)]
    if spec.mask is not None:
        changes["mask"] = place(spec.mask, "mask")
    return spec.model_copy(update=changes)
