"""``enclave demo``: the whole mission on embedded defaults (run by ``./scripts/demo``).

1. a temporary state directory; its local CA (the attestation root, like AWS's Nitro root);
2. the KMS daemon (SQLite) with two principals: the *model owner* and the *instance*;
3. the host services: vsock-proxy (3, 8000) -> KMS, the model store (3, 7000), later the ingress;
4. the server image (``models/text_app`` built with ``build_eif``: the server configured for
   the digits model and MiniLM): PCR0/1/2;
5. a KMS key whose policy lets the owner create data keys and lets the instance ``Decrypt`` only
   with a Recipient attestation whose ``ImageSha384`` is that image's PCR0;
6. the bundled digits model and the MiniLM bundle (graph + tokenizer + config, one unit) sealed
   under that key (owner credentials);
7. the enclave (not debug): it unseals both with attested key release, extends PCR16 with their
   digests and serves on vsock port 5005;
8. the client through the ingress: verifies the attestation (local root, PCR0, PCR16 = these
   models) before sending anything, streams the whole test split, prints accuracy, latency,
   throughput and the verified measurements;
8b. the second act: twenty confidential documents embedded inside the enclave, queries matched
   to them, the latency against in-process onnxruntime;
9. the same image in debug mode: PCR0 reads as zeros, KMS refuses the keys (reason from the
   audit log), the server reports the models unavailable;
9b. hold your own key (third act): the model sealed again under a KMS key in an external key
   store whose second layer is the owner's key in its own XKS proxy (``enclave kms
   xks-proxy``); an enclave unseals it; the owner disables its key in the proxy; the next start
   of the enclave is refused with AWS's error (``KMSInvalidStateException``, its message shown);
10. everything stopped and removed (``--keep`` leaves the stack up, prints one ready-to-run
    ``enclave infer`` line per served model, and stops at Ctrl-C or SIGTERM).

With ``--replicas N`` step 7 starts N replicas of the image (group ``server``: each its own CID
and module id, the same PCR0/1/2 and, once they loaded the model, PCR16) and step 8's ingress
spreads connections over them by least connections; the ``enclave infer`` lines are the same.

The building blocks live in :mod:`runtime.stack`; this package adds the steps and their
narration, one module per seam:

- :mod:`~runtime.demo.steps`: :func:`run_demo`, the steps above in order;
- :mod:`~runtime.demo.digits`: step 8's measurement (accuracy, throughput, latency);
- :mod:`~runtime.demo.text`: the second act (confidential text search with MiniLM);
- :mod:`~runtime.demo.debug`: step 9 (the debug enclave refused the keys);
- :mod:`~runtime.demo.hyok`: the third act (hold your own key);
- :mod:`~runtime.demo.keep`: what ``--keep`` writes and prints;
- :mod:`~runtime.demo.narration`: :class:`Console`, the step-by-step output;
- :mod:`~runtime.demo.results`: :class:`DemoResults`, :class:`DemoFigures`, :class:`DemoFailure`;
- :mod:`~runtime.demo.process`: :func:`main` (the parent), :func:`run_in_process` and the child
  process (``python -m runtime.demo``): Ctrl-C, SIGTERM, exit statuses, the state directory.

Why a package and not ``runtime/demo.py`` beside ``runtime/demo_*.py`` modules: the demo runs
its child as ``python -m runtime.demo``; with a package that runs ``__main__.py`` while
``runtime.demo`` and its modules are imported once, the normal way (a module run with ``-m`` is
executed as ``__main__``, a second copy of its classes beside any import of it). And the acts
sit under one name instead of spreading over ``runtime/``. This face only re-exports.
"""

from runtime.demo.digits import LATENCY_SAMPLES
from runtime.demo.narration import Console
from runtime.demo.process import main, run_in_process
from runtime.demo.results import DemoFailure, DemoFigures, DemoResults
from runtime.demo.steps import run_demo

# The building blocks moved to runtime.stack; re-exported here for code written against
# ``runtime.demo`` before they moved (the tests among it). Not part of this face's ``__all__``.
from runtime.stack import SERVER_APP_DIR as SERVER_APP_DIR
from runtime.stack import SERVER_CMD as SERVER_CMD
from runtime.stack import STORE_PORT as STORE_PORT
from runtime.stack import Stack as Stack
from runtime.stack import build_server_image as build_server_image
from runtime.stack import create_model_key as create_model_key
from runtime.stack import model_key_policy as model_key_policy
from runtime.stack import open_stack as open_stack
from runtime.stack import seal_bundled_model as seal_bundled_model
from runtime.stack import start_server as start_server

__all__ = [
    "main",
    "run_in_process",
    "run_demo",
    "DemoResults",
    "DemoFigures",
    "DemoFailure",
    "Console",
    "LATENCY_SAMPLES",
]
