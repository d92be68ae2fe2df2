"""The KV-cache policies: one file per published method. Every module in this folder is imported here, and each
registers its policy, so a new method is one new file."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
