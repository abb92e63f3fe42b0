"""Helper for package faces (private): show public names under the face that exports them."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["fixup_module_metadata"]


def fixup_module_metadata(module_name: str, namespace: Mapping[str, object]) -> None:
    """Set ``__module__`` of every name in ``namespace["__all__"]`` that was defined in a
    private submodule of ``module_name`` to ``module_name``, so reprs, tracebacks and docs say
    ``transport.rpc.RpcStream`` rather than ``transport.rpc._stream.RpcStream`` (trio does the
    same in its ``__init__``). Objects that refuse the assignment are left alone."""
    prefix = module_name + "._"
    names = namespace.get("__all__", ())
    assert isinstance(names, list | tuple)
    for name in names:
        obj = namespace[name]
        if getattr(obj, "__module__", "").startswith(prefix):
            try:
                obj.__module__ = module_name
            except (AttributeError, TypeError):  # e.g. type aliases, builtins
                pass
