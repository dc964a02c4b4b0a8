"""Cell keys: the sha256 of everything that changes a cell's result.

Config (device and logging excluded, `RunConfig.key_dict`), the split manifest's hash, the data
hash and the method's code version (core/methods.py). Bump a method's version when a code change alters its
results (the detector's version when shared code does): old cells then get new keys instead of
being reused.
"""

from __future__ import annotations

import hashlib
import json

from core.methods import METHODS

# The detector code shared by every method. 2: frozen BN folded into the convs, channels-last
# trunk (float rounding). 3: RoIAlign as one weighted gather over all levels, NMS in float64 with
# the levels (classes) offset, 1x1 convolutions as matrix products (float rounding; same draws).
# 4: RoIAlign with the half-pixel offset (`model.pooler_aligned`, on by default) as the originals.
DETECTOR_VERSION = 4
# LSM's code, in the key of LSM cells only. 2: PIM's labeled and unlabeled groups share one
# half-size backbone pass and one head pass (float rounding). 3: the main branch's RoI classification
# leaves out the RoIs of pseudo-boxes scored in (alpha, t] (`lsm.ignore_uncertain`, on by default).
# 4: PIM's classifier learns with plain cross-entropy (`lsm.pim_cls_loss: ce`) as the authors' code,
# not the host's RoI loss (UBT's focal, PseCo's sigmoid focal).
LSM_VERSION = 4


def cell_key(cfg, data) -> str:
    """`cfg`: a RunConfig; `data`: its SemiData (core/data/sources.py)."""
    payload = {
        "config": cfg.key_dict(),
        "split": data.manifest.sha256,
        "data": data.manifest.data_hash,
        "code": METHODS[cfg.method].code_version if cfg.method in METHODS else 1,
        "detector": DETECTOR_VERSION,
    }
    if cfg.lsm.enabled:
        payload["lsm"] = LSM_VERSION
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
