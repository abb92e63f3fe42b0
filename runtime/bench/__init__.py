"""The performance suites of ``enclave bench``, one module per suite, kept out of the product.

Each suite module exposes ``run(*, quick: bool) -> dict[str, float | int | str | None]``: it
measures its anchors (raw ``cryptography``, a plain trio round trip, in-process
``session.run``, the peer a user would otherwise pick...) in the same run and reports ratios
against them. ``runtime.cli.bench`` maps suite names to these modules and checks budgets.
"""

__all__ = []
