"""The model store: versioned, hash-checked model packages and the pointer to the served version."""

from edgegen.store.manifest import Manifest, TensorSpec
from edgegen.store.store import ModelPackage, ModelStore

__all__ = ["Manifest", "ModelPackage", "ModelStore", "TensorSpec"]
