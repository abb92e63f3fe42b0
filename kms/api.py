"""The AWS KMS JSON 1.1 request layer (pure): operation table, JSON decoding and validation.

:func:`parse_request` takes the ``X-Amz-Target`` value and the raw body and returns the
operation name and a dict of validated Python values (base64 fields decoded to ``bytes``), or
raises :class:`~kms.errors.KmsApiError` with the ``__type`` AWS uses:

* ``UnknownOperationException`` - missing/unknown target;
* ``SerializationException`` - body is not a JSON object, a field has the wrong JSON type, or a
  blob is not base64;
* ``ValidationException`` - a constraint fails (length, range, enum, required), in AWS's
  "1 validation error detected: ..." wording (values are not echoed: they may be secret).

Unknown fields are ignored, as AWS does (newer SDKs send members older services do not know).
Work is bounded: the body size is capped by the adapter, JSON nesting by :data:`MAX_JSON_DEPTH`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import KmsApiError
from .keyspecs import CMK_SPECS

__all__ = [
    "OPERATIONS",
    "UNSUPPORTED",
    "TARGET_PREFIX",
    "parse_request",
    "FieldSpec",
    "MAX_JSON_DEPTH",
    "MAX_POLICY_CHARS",
    "KEY_SPECS",
    "SIGNING_ALGORITHMS",
    "GRANT_OPERATIONS",
]

#: Every KMS target is ``TrentService.<Operation>`` (the service's historical code name).
TARGET_PREFIX = "TrentService."
#: KMS requests nest at most 3 levels (Recipient / Tags); 8 leaves slack and bounds recursion.
MAX_JSON_DEPTH = 8
#: EncryptionContext pairs: AWS caps the whole context at 8192 characters.
MAX_CONTEXT_CHARS = 8192

_ENC_ALGS = ("SYMMETRIC_DEFAULT", "RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256", "SM2PKE")
#: KeySpec values (botocore's model, 2014-11-01 as of botocore 1.44).
KEY_SPECS = (
    "RSA_2048",
    "RSA_3072",
    "RSA_4096",
    "ECC_NIST_P256",
    "ECC_NIST_P384",
    "ECC_NIST_P521",
    "ECC_SECG_P256K1",
    "SYMMETRIC_DEFAULT",
    "HMAC_224",
    "HMAC_256",
    "HMAC_384",
    "HMAC_512",
    "SM2",
    "ML_DSA_44",
    "ML_DSA_65",
    "ML_DSA_87",
    "ECC_NIST_EDWARDS25519",
    "ML_KEM_512",
    "ML_KEM_768",
    "ML_KEM_1024",
)
#: The deprecated CustomerMasterKeySpec keeps its older, shorter list (kms.keyspecs owns it).
_CMK_SPECS = tuple(spec for spec in KEY_SPECS if spec in CMK_SPECS)
_KEY_USAGES = (
    "SIGN_VERIFY",
    "ENCRYPT_DECRYPT",
    "GENERATE_VERIFY_MAC",
    "KEY_AGREEMENT",
    "ENCAPSULATE_DECAPSULATE",
)
_ORIGINS = ("AWS_KMS", "EXTERNAL", "AWS_CLOUDHSM", "EXTERNAL_KEY_STORE")
SIGNING_ALGORITHMS = (
    "RSASSA_PSS_SHA_256",
    "RSASSA_PSS_SHA_384",
    "RSASSA_PSS_SHA_512",
    "RSASSA_PKCS1_V1_5_SHA_256",
    "RSASSA_PKCS1_V1_5_SHA_384",
    "RSASSA_PKCS1_V1_5_SHA_512",
    "ECDSA_SHA_256",
    "ECDSA_SHA_384",
    "ECDSA_SHA_512",
    "SM2DSA",
    "ML_DSA_SHAKE_256",
    "ED25519_SHA_512",
    "ED25519_PH_SHA_512",
)
_MESSAGE_TYPES = ("RAW", "DIGEST", "EXTERNAL_MU")
_MAC_ALGS = ("HMAC_SHA_224", "HMAC_SHA_256", "HMAC_SHA_384", "HMAC_SHA_512")
_DATA_KEY_PAIR_SPECS = (
    "RSA_2048",
    "RSA_3072",
    "RSA_4096",
    "ECC_NIST_P256",
    "ECC_NIST_P384",
    "ECC_NIST_P521",
    "ECC_SECG_P256K1",
    "SM2",
    "ECC_NIST_EDWARDS25519",
    "ML_KEM_512",
    "ML_KEM_768",
    "ML_KEM_1024",
)
GRANT_OPERATIONS = (
    "Decrypt",
    "Encrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "ReEncryptFrom",
    "ReEncryptTo",
    "Sign",
    "Verify",
    "GetPublicKey",
    "CreateGrant",
    "RetireGrant",
    "DescribeKey",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    "GenerateMac",
    "VerifyMac",
    "DeriveSharedSecret",
    "Encapsulate",
    "Decapsulate",
)
_WRAPPING_ALGS = (
    "RSAES_PKCS1_V1_5",
    "RSAES_OAEP_SHA_1",
    "RSAES_OAEP_SHA_256",
    "RSA_AES_KEY_WRAP_SHA_1",
    "RSA_AES_KEY_WRAP_SHA_256",
    "SM2PKE",
)
#: KeyEncapsulationAlgorithmSpec (ML-KEM keys).
_ENCAPSULATION_ALGS = ("ML_KEM",)
_WRAPPING_KEY_SPECS = ("RSA_2048", "RSA_3072", "RSA_4096", "SM2")
_EXPIRATION_MODELS = ("KEY_MATERIAL_EXPIRES", "KEY_MATERIAL_DOES_NOT_EXPIRE")
_IMPORT_TYPES = ("NEW_KEY_MATERIAL", "EXISTING_KEY_MATERIAL")
_INCLUDE_KEY_MATERIAL = ("ALL_KEY_MATERIAL", "ROTATIONS_ONLY")
#: The longest key policy (characters) the model allows.
MAX_POLICY_CHARS = 131072
_POLICY_RE = re.compile(r"^[\u0009\u000A\u000D\u0020-\u00FF]+$")
_PRINCIPAL_RE = re.compile(r"^[\w+=,.@:/-]+$")
_SERVICE_PRINCIPAL_RE = re.compile(r"^([A-Za-z0-9\-]+)\.([A-Za-z0-9\-]+)(\.[A-Za-z0-9\-]+)+$")
_GRANT_NAME_RE = re.compile(r"^[a-zA-Z0-9:/_-]+$")
_MATERIAL_ID_RE = re.compile(r"^[a-f0-9]+$")
_MATERIAL_DESCRIPTION_RE = re.compile(r"^[a-zA-Z0-9:/_\s.-]+$")
_XKS_KEY_ID_RE = re.compile(r"^[a-zA-Z0-9-_.]+$")
_MARKER_RE = re.compile(r"^[\u0020-\u00FF]*$")
_ALIAS_RE = re.compile(r"^[a-zA-Z0-9:/_-]+$")


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One request member: JSON kind plus constraints."""

    #: "str" | "blob" | "int" | "bool" | "map" | "strlist" | "enumlist" | "timestamp" |
    #: "recipient" | "tags" | "constraints" | "xkscredential"
    kind: str
    required: bool = False
    min: int | None = None
    max: int | None = None
    enum: tuple[str, ...] | None = None
    pattern: re.Pattern[str] | None = None
    #: Each element of a "strlist".
    item: FieldSpec | None = None


def _s(lo: int = 1, hi: int = 2048, *, req: bool = False, **kw: Any) -> FieldSpec:
    return FieldSpec("str", req, lo, hi, **kw)


def _e(values: tuple[str, ...], *, req: bool = False) -> FieldSpec:
    return FieldSpec("str", req, enum=values)


def _b(lo: int, hi: int, *, req: bool = False) -> FieldSpec:
    return FieldSpec("blob", req, lo, hi)


def _i(lo: int, hi: int, *, req: bool = False) -> FieldSpec:
    return FieldSpec("int", req, lo, hi)


_BOOL = FieldSpec("bool")
_KEY_ID = _s(req=True)
_CTX = FieldSpec("map")
_GRANTS = FieldSpec("strlist", max=10, item=_s(1, 8192))
_RECIPIENT = FieldSpec("recipient")
_LIMIT = _i(1, 1000)
_MARKER = _s(1, 1024, pattern=_MARKER_RE)
_ALIAS = _s(1, 256, req=True, pattern=_ALIAS_RE)
_MESSAGE = _b(1, 4096, req=True)
_CIPHERTEXT = _b(1, 6144, req=True)
_PRINCIPAL = _s(1, 256, pattern=_PRINCIPAL_RE)
_SERVICE_PRINCIPAL = _s(1, 128, pattern=_SERVICE_PRINCIPAL_RE)
_GRANT_ID = _s(1, 128)
_MATERIAL_ID = _s(64, 64, pattern=_MATERIAL_ID_RE)
_DRY_RUN_MODIFIERS = FieldSpec("enumlist", enum=("IGNORE_CIPHERTEXT",))
_TAGS = FieldSpec("tags")
_POLICY = _s(1, MAX_POLICY_CHARS, pattern=_POLICY_RE)
_LIST = {"KeyId": _KEY_ID, "Limit": _LIMIT, "Marker": _MARKER}

_STORE_ID_REQ = _s(1, 64, req=True)
_STORE_NAME = _s(1, 256)
_STORE_NAME_REQ = _s(1, 256, req=True)
#: The members CreateCustomKeyStore and UpdateCustomKeyStore share (the model's). The model's
#: XksProxyUriEndpoint pattern (``^https://[a-zA-Z0-9.-]+$``) is not applied here: this KMS
#: also takes a port and plain http:// to loopback (kms.keystores.record.validate_endpoint).
_STORE_SETTINGS: dict[str, FieldSpec] = {
    "CloudHsmClusterId": _s(19, 24),
    "TrustAnchorCertificate": _s(1, 5000),
    "KeyStorePassword": _s(7, 32),
    "CustomKeyStoreType": _e(("AWS_CLOUDHSM", "EXTERNAL_KEY_STORE")),
    "XksProxyUriEndpoint": _s(10, 128),
    "XksProxyUriPath": _s(10, 128),
    "XksProxyVpcEndpointServiceName": _s(20, 64),
    "XksProxyVpcEndpointServiceOwner": _s(12, 12),
    "XksProxyAuthenticationCredential": FieldSpec("xkscredential"),
    "XksProxyConnectivity": _e(("PUBLIC_ENDPOINT", "VPC_ENDPOINT_SERVICE")),
}
_CREATE_ONLY = ("TrustAnchorCertificate", "CustomKeyStoreType")

#: Operation → member specs, as botocore's KMS model states them (a test compares the two).
OPERATIONS: dict[str, dict[str, FieldSpec]] = {
    "CreateKey": {
        "Policy": _POLICY,
        "Description": _s(0, 8192),
        "KeyUsage": _e(_KEY_USAGES),
        "CustomerMasterKeySpec": _e(_CMK_SPECS),
        "KeySpec": _e(KEY_SPECS),
        "Origin": _e(_ORIGINS),
        "CustomKeyStoreId": _s(1, 64),
        "BypassPolicyLockoutSafetyCheck": _BOOL,
        "Tags": _TAGS,
        "MultiRegion": _BOOL,
        "XksKeyId": _s(1, 128, pattern=_XKS_KEY_ID_RE),
    },
    "DescribeKey": {"KeyId": _KEY_ID, "GrantTokens": _GRANTS},
    "ListKeys": {
        "Limit": _LIMIT,
        "Marker": _MARKER,
        # No RAM here: OTHER_ACCOUNTS_VIA_RAM lists nothing.
        "ResourceOwners": FieldSpec(
            "enumlist", min=1, max=2, enum=("SELF", "OTHER_ACCOUNTS_VIA_RAM")
        ),
    },
    "CreateAlias": {"AliasName": _ALIAS, "TargetKeyId": _KEY_ID},
    "UpdateAlias": {"AliasName": _ALIAS, "TargetKeyId": _KEY_ID},
    "DeleteAlias": {"AliasName": _ALIAS},
    "ListAliases": {"KeyId": _s(), "Limit": _LIMIT, "Marker": _MARKER},
    "Encrypt": {
        "KeyId": _KEY_ID,
        "Plaintext": _MESSAGE,
        "EncryptionContext": _CTX,
        "GrantTokens": _GRANTS,
        "EncryptionAlgorithm": _e(_ENC_ALGS),
        "DryRun": _BOOL,
    },
    "Decrypt": {
        # Optional in the model since DryRunModifiers: required unless IGNORE_CIPHERTEXT.
        "CiphertextBlob": _b(1, 6144),
        "EncryptionContext": _CTX,
        "GrantTokens": _GRANTS,
        "KeyId": _s(),
        "EncryptionAlgorithm": _e(_ENC_ALGS),
        "Recipient": _RECIPIENT,
        "DryRun": _BOOL,
        "DryRunModifiers": _DRY_RUN_MODIFIERS,
    },
    "ReEncrypt": {
        "CiphertextBlob": _b(1, 6144),
        "SourceEncryptionContext": _CTX,
        "SourceKeyId": _s(),
        "DestinationKeyId": _KEY_ID,
        "DestinationEncryptionContext": _CTX,
        "SourceEncryptionAlgorithm": _e(_ENC_ALGS),
        "DestinationEncryptionAlgorithm": _e(_ENC_ALGS),
        "GrantTokens": _GRANTS,
        "DryRun": _BOOL,
        "DryRunModifiers": _DRY_RUN_MODIFIERS,
    },
    "GenerateDataKey": {
        "KeyId": _KEY_ID,
        "EncryptionContext": _CTX,
        "NumberOfBytes": _i(1, 1024),
        "KeySpec": _e(("AES_256", "AES_128")),
        "GrantTokens": _GRANTS,
        "Recipient": _RECIPIENT,
        "DryRun": _BOOL,
    },
    "GenerateDataKeyWithoutPlaintext": {
        "KeyId": _KEY_ID,
        "EncryptionContext": _CTX,
        "KeySpec": _e(("AES_256", "AES_128")),
        "NumberOfBytes": _i(1, 1024),
        "GrantTokens": _GRANTS,
        "DryRun": _BOOL,
    },
    "GenerateDataKeyPair": {
        "EncryptionContext": _CTX,
        "KeyId": _KEY_ID,
        "KeyPairSpec": _e(_DATA_KEY_PAIR_SPECS, req=True),
        "GrantTokens": _GRANTS,
        "Recipient": _RECIPIENT,
        "DryRun": _BOOL,
    },
    "GenerateDataKeyPairWithoutPlaintext": {
        "EncryptionContext": _CTX,
        "KeyId": _KEY_ID,
        "KeyPairSpec": _e(_DATA_KEY_PAIR_SPECS, req=True),
        "GrantTokens": _GRANTS,
        "DryRun": _BOOL,
    },
    "GenerateRandom": {
        "NumberOfBytes": _i(1, 1024),
        "CustomKeyStoreId": _s(1, 64),
        "Recipient": _RECIPIENT,
    },
    "GetKeyPolicy": {"KeyId": _KEY_ID, "PolicyName": _s(1, 128, pattern=re.compile(r"^[\w]+$"))},
    "PutKeyPolicy": {
        "KeyId": _KEY_ID,
        "PolicyName": _s(1, 128, pattern=re.compile(r"^[\w]+$")),
        "Policy": FieldSpec("str", True, 1, MAX_POLICY_CHARS, pattern=_POLICY_RE),
        "BypassPolicyLockoutSafetyCheck": _BOOL,
    },
    "EnableKey": {"KeyId": _KEY_ID},
    "DisableKey": {"KeyId": _KEY_ID},
    # The model allows 1..365; AWS's service refuses outside 7..30 (ValidationException).
    "ScheduleKeyDeletion": {"KeyId": _KEY_ID, "PendingWindowInDays": _i(7, 30)},
    "CancelKeyDeletion": {"KeyId": _KEY_ID},
    "EnableKeyRotation": {"KeyId": _KEY_ID, "RotationPeriodInDays": _i(90, 2560)},
    "DisableKeyRotation": {"KeyId": _KEY_ID},
    "GetKeyRotationStatus": {"KeyId": _KEY_ID},
    "RotateKeyOnDemand": {"KeyId": _KEY_ID},
    # -- asymmetric, HMAC and key agreement
    "Sign": {
        "KeyId": _KEY_ID,
        "Message": _MESSAGE,
        "MessageType": _e(_MESSAGE_TYPES),
        "GrantTokens": _GRANTS,
        "SigningAlgorithm": _e(SIGNING_ALGORITHMS, req=True),
        "DryRun": _BOOL,
    },
    "Verify": {
        "KeyId": _KEY_ID,
        "Message": _MESSAGE,
        "MessageType": _e(_MESSAGE_TYPES),
        "Signature": _CIPHERTEXT,
        "SigningAlgorithm": _e(SIGNING_ALGORITHMS, req=True),
        "GrantTokens": _GRANTS,
        "DryRun": _BOOL,
    },
    "GetPublicKey": {"KeyId": _KEY_ID, "GrantTokens": _GRANTS},
    "GenerateMac": {
        "Message": _MESSAGE,
        "KeyId": _KEY_ID,
        "MacAlgorithm": _e(_MAC_ALGS, req=True),
        "GrantTokens": _GRANTS,
        "DryRun": _BOOL,
    },
    "VerifyMac": {
        "Message": _MESSAGE,
        "KeyId": _KEY_ID,
        "MacAlgorithm": _e(_MAC_ALGS, req=True),
        "Mac": _CIPHERTEXT,
        "GrantTokens": _GRANTS,
        "DryRun": _BOOL,
    },
    "Encapsulate": {
        "KeyId": _KEY_ID,
        "EncapsulationAlgorithm": _e(_ENCAPSULATION_ALGS, req=True),
        "GrantTokens": _GRANTS,
        "DryRun": _BOOL,
    },
    "Decapsulate": {
        "KeyId": _KEY_ID,
        "SharedSecretCiphertextBlob": _CIPHERTEXT,
        "EncapsulationAlgorithm": _e(_ENCAPSULATION_ALGS, req=True),
        "GrantTokens": _GRANTS,
        "DryRun": _BOOL,
    },
    "DeriveSharedSecret": {
        "KeyId": _KEY_ID,
        "KeyAgreementAlgorithm": _e(("ECDH",), req=True),
        "PublicKey": _b(1, 8192, req=True),
        "GrantTokens": _GRANTS,
        "DryRun": _BOOL,
        "Recipient": _RECIPIENT,
    },
    # -- grants
    "CreateGrant": {
        "KeyId": _KEY_ID,
        "GranteePrincipal": _PRINCIPAL,
        "RetiringPrincipal": _PRINCIPAL,
        "Operations": FieldSpec("enumlist", True, enum=GRANT_OPERATIONS),
        "Constraints": FieldSpec("constraints"),
        "GrantTokens": _GRANTS,
        "Name": _s(1, 256, pattern=_GRANT_NAME_RE),
        "DryRun": _BOOL,
        "GranteeServicePrincipal": _SERVICE_PRINCIPAL,
        "RetiringServicePrincipal": _SERVICE_PRINCIPAL,
    },
    "ListGrants": {
        **_LIST,
        "GrantId": _GRANT_ID,
        "GranteePrincipal": _PRINCIPAL,
        "GranteeServicePrincipal": _SERVICE_PRINCIPAL,
    },
    "ListRetirableGrants": {
        "Limit": _LIMIT,
        "Marker": _MARKER,
        "RetiringPrincipal": _PRINCIPAL,
        "RetiringServicePrincipal": _SERVICE_PRINCIPAL,
    },
    "RetireGrant": {
        "GrantToken": _s(1, 8192),
        "KeyId": _s(),
        "GrantId": _GRANT_ID,
        "DryRun": _BOOL,
    },
    "RevokeGrant": {"KeyId": _KEY_ID, "GrantId": _s(1, 128, req=True), "DryRun": _BOOL},
    # -- metadata
    "TagResource": {"KeyId": _KEY_ID, "Tags": FieldSpec("tags", True)},
    "UntagResource": {"KeyId": _KEY_ID, "TagKeys": FieldSpec("strlist", True, item=_s(1, 128))},
    "ListResourceTags": dict(_LIST),
    "UpdateKeyDescription": {"KeyId": _KEY_ID, "Description": _s(0, 8192, req=True)},
    "ListKeyPolicies": dict(_LIST),
    "ListKeyRotations": {**_LIST, "IncludeKeyMaterial": _e(_INCLUDE_KEY_MATERIAL)},
    # -- BYOK
    "GetParametersForImport": {
        "KeyId": _KEY_ID,
        "WrappingAlgorithm": _e(_WRAPPING_ALGS, req=True),
        "WrappingKeySpec": _e(_WRAPPING_KEY_SPECS, req=True),
    },
    "ImportKeyMaterial": {
        "KeyId": _KEY_ID,
        "ImportToken": _CIPHERTEXT,
        "EncryptedKeyMaterial": _CIPHERTEXT,
        "ValidTo": FieldSpec("timestamp"),
        "ExpirationModel": _e(_EXPIRATION_MODELS),
        "ImportType": _e(_IMPORT_TYPES),
        "KeyMaterialDescription": _s(0, 256, pattern=_MATERIAL_DESCRIPTION_RE),
        "KeyMaterialId": _MATERIAL_ID,
    },
    "DeleteImportedKeyMaterial": {"KeyId": _KEY_ID, "KeyMaterialId": _MATERIAL_ID},
    # -- custom key stores (external key stores only: kms.service.keystores)
    "CreateCustomKeyStore": {"CustomKeyStoreName": _STORE_NAME_REQ, **_STORE_SETTINGS},
    "ConnectCustomKeyStore": {"CustomKeyStoreId": _STORE_ID_REQ},
    "DisconnectCustomKeyStore": {"CustomKeyStoreId": _STORE_ID_REQ},
    "UpdateCustomKeyStore": {
        "CustomKeyStoreId": _STORE_ID_REQ,
        "NewCustomKeyStoreName": _STORE_NAME,
        **{k: v for k, v in _STORE_SETTINGS.items() if k not in _CREATE_ONLY},
    },
    "DeleteCustomKeyStore": {"CustomKeyStoreId": _STORE_ID_REQ},
    "DescribeCustomKeyStores": {
        "CustomKeyStoreId": _s(1, 64),
        "CustomKeyStoreName": _STORE_NAME,
        "Limit": _LIMIT,
        "Marker": _MARKER,
    },
}

#: Operations of the model this KMS does not serve: each answers UnsupportedOperationException
#: naming itself (the service's table says why). Their members are not validated.
UNSUPPORTED: frozenset[str] = frozenset(
    {
        "ReplicateKey",
        "UpdatePrimaryRegion",
        "GetKeyLastUsage",
    }
)
for _name in UNSUPPORTED:
    OPERATIONS[_name] = {}


def _member(name: str) -> str:
    """AWS's validation messages name members in camelCase (``keyId``)."""
    return name[:1].lower() + name[1:]


def _validation(name: str, constraint: str) -> KmsApiError:
    return KmsApiError(
        "ValidationException",
        f"1 validation error detected: Value at '{_member(name)}' failed to satisfy "
        f"constraint: {constraint}",
    )


def _serialization(name: str, expected: str) -> KmsApiError:
    return KmsApiError("SerializationException", f"Member '{name}' must be a JSON {expected}.")


def _check_len(name: str, n: int, spec: FieldSpec) -> None:
    if spec.min is not None and n < spec.min:
        raise _validation(name, f"Member must have length greater than or equal to {spec.min}")
    if spec.max is not None and n > spec.max:
        raise _validation(name, f"Member must have length less than or equal to {spec.max}")


def _str(name: str, value: Any, spec: FieldSpec) -> str:
    if not isinstance(value, str):
        raise _serialization(name, "string")
    if spec.enum is not None:
        if value not in spec.enum:
            raise _validation(name, f"Member must satisfy enum value set: [{', '.join(spec.enum)}]")
        return value
    _check_len(name, len(value), spec)
    # fullmatch: a pattern's ``$`` would also accept a trailing newline.
    if spec.pattern is not None and not spec.pattern.fullmatch(value):
        raise _validation(
            name, f"Member must satisfy regular expression pattern: {spec.pattern.pattern}"
        )
    return value


def _blob(name: str, value: Any, spec: FieldSpec) -> bytes:
    if not isinstance(value, str):
        raise _serialization(name, "string (base64)")
    # Bound the work before decoding: base64 is 4/3 of the raw size.
    if spec.max is not None and len(value) > (spec.max + 2) // 3 * 4 + 4:
        raise _validation(name, f"Member must have length less than or equal to {spec.max}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KmsApiError(
            "SerializationException", f"Member '{name}' is not valid base64."
        ) from None
    _check_len(name, len(raw), spec)
    return raw


def _int(name: str, value: Any, spec: FieldSpec) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _serialization(name, "integer")
    if spec.min is not None and value < spec.min:
        raise _validation(name, f"Member must have value greater than or equal to {spec.min}")
    if spec.max is not None and value > spec.max:
        raise _validation(name, f"Member must have value less than or equal to {spec.max}")
    return value


def _bool(name: str, value: Any, spec: FieldSpec) -> bool:
    if not isinstance(value, bool):
        raise _serialization(name, "boolean")
    return value


def _map(name: str, value: Any, spec: FieldSpec) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _serialization(name, "object")
    total = 0
    for k, v in value.items():
        if not isinstance(v, str):
            raise _serialization(f"{name}.{k}", "string")
        if not k:
            raise _validation(name, "Map keys must have length greater than or equal to 1")
        total += len(k) + len(v)
    if total > MAX_CONTEXT_CHARS:
        raise _validation(name, f"Map must have at most {MAX_CONTEXT_CHARS} characters")
    return dict(value)


def _strlist(name: str, value: Any, spec: FieldSpec) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _serialization(name, "list of strings")
    _check_len(name, len(value), spec)
    if spec.item is not None:
        for i, v in enumerate(value):
            _str(f"{name}.{i + 1}.member", v, spec.item)
    return list(value)


def _enumlist(name: str, value: Any, spec: FieldSpec) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _serialization(name, "list of strings")
    assert spec.enum is not None
    _check_len(name, len(value), spec)
    for v in value:
        if v not in spec.enum:
            raise _validation(
                name,
                f"Member must satisfy constraint: [Member must satisfy enum value set: "
                f"[{', '.join(spec.enum)}]]",
            )
    return list(value)


def _timestamp(name: str, value: Any, spec: FieldSpec) -> float:
    # The JSON protocol sends timestamps as epoch seconds (boto3, the AWS CLI).
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _serialization(name, "number (epoch seconds)")
    if not 0 <= value < 2**40:  # beyond year 36000: not a date anyone means
        raise _validation(name, "Member must be a valid timestamp")
    return float(value)


#: A grant constraint's encryption context: at most 8 pairs, each value at most 384 characters.
_MAX_CONSTRAINT_PAIRS = 8
_MAX_CONSTRAINT_VALUE = 384


def _constraints(name: str, value: Any, spec: FieldSpec) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _serialization(name, "object")
    out: dict[str, Any] = {}
    for member in ("EncryptionContextSubset", "EncryptionContextEquals"):
        if value.get(member) is not None:
            ctx = _map(f"{name}.{member}", value[member], _CTX)
            if len(ctx) > _MAX_CONSTRAINT_PAIRS or any(
                len(v) > _MAX_CONSTRAINT_VALUE for v in ctx.values()
            ):
                raise _validation(
                    f"{name}.{member}",
                    f"at most {_MAX_CONSTRAINT_PAIRS} pairs, each value at most "
                    f"{_MAX_CONSTRAINT_VALUE} characters",
                )
            out[member] = ctx
    if value.get("SourceArn") is not None:
        out["SourceArn"] = _str(f"{name}.SourceArn", value["SourceArn"], _s(1, 2048))
    return out


def _recipient(name: str, value: Any, spec: FieldSpec) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _serialization(name, "object")
    out: dict[str, Any] = {}
    doc = value.get("AttestationDocument")
    if doc is None:
        raise _validation("Recipient.AttestationDocument", "Member must not be null")
    out["AttestationDocument"] = _blob("AttestationDocument", doc, _b(1, 262144))
    alg = value.get("KeyEncryptionAlgorithm", "RSAES_OAEP_SHA_256")
    out["KeyEncryptionAlgorithm"] = _str("KeyEncryptionAlgorithm", alg, _e(("RSAES_OAEP_SHA_256",)))
    return out


def _tags(name: str, value: Any, spec: FieldSpec) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise _serialization(name, "list")
    _check_len(name, len(value), spec)
    out = []
    for t in value:
        if not isinstance(t, dict):
            raise _serialization(name, "list of objects")
        key = _str("TagKey", t.get("TagKey"), _s(1, 128))
        val = _str("TagValue", t.get("TagValue"), _s(0, 256))
        out.append({"TagKey": key, "TagValue": val})
    return out


#: XksProxyAuthenticationCredential's members (the model's; the spec's credential formats).
_XKS_ACCESS_KEY_ID = _s(20, 30, req=True, pattern=re.compile(r"^[A-Z2-7]+$"))
_XKS_SECRET = _s(43, 64, req=True, pattern=re.compile(r"^[a-zA-Z0-9/+=]+$"))


def _xks_credential(name: str, value: Any, spec: FieldSpec) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _serialization(name, "object")
    out: dict[str, str] = {}
    for member, member_spec in (
        ("AccessKeyId", _XKS_ACCESS_KEY_ID),
        ("RawSecretAccessKey", _XKS_SECRET),
    ):
        full = f"{name}.{member}"
        if value.get(member) is None:
            raise _validation(full, "Member must not be null")
        out[member] = _str(full, value[member], member_spec)
    return out


_DECODERS: dict[str, Callable[[str, Any, FieldSpec], Any]] = {
    "str": _str,
    "blob": _blob,
    "int": _int,
    "bool": _bool,
    "map": _map,
    "strlist": _strlist,
    "enumlist": _enumlist,
    "timestamp": _timestamp,
    "recipient": _recipient,
    "tags": _tags,
    "constraints": _constraints,
    "xkscredential": _xks_credential,
}


def _depth_ok(value: Any, depth: int = 0) -> bool:
    if depth > MAX_JSON_DEPTH:
        return False
    if isinstance(value, dict):
        return all(_depth_ok(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return all(_depth_ok(v, depth + 1) for v in value)
    return True


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate member {k!r}")
        out[k] = v
    return out


def operation_of(target: str | None) -> str:
    """The operation named by an ``X-Amz-Target`` header (UnknownOperationException if none)."""
    if target is None or not target.startswith(TARGET_PREFIX):
        raise KmsApiError("UnknownOperationException", "")
    op = target[len(TARGET_PREFIX) :]
    if op not in OPERATIONS:
        raise KmsApiError("UnknownOperationException", "")
    return op


def validate(operation: str, doc: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an already-decoded JSON object against ``operation``'s members."""
    specs = OPERATIONS[operation]
    out: dict[str, Any] = {}
    for name, spec in specs.items():
        value = doc.get(name)
        if value is None:
            if spec.required:
                raise KmsApiError(
                    "ValidationException",
                    f"1 validation error detected: Value null at '{_member(name)}' failed to "
                    "satisfy constraint: Member must not be null",
                )
            continue
        out[name] = _DECODERS[spec.kind](name, value, spec)
    return out


def parse_request(target: str | None, body: bytes) -> tuple[str, dict[str, Any]]:
    """Decode and validate one request. See the module docstring for the errors."""
    operation = operation_of(target)
    try:
        doc = json.loads(body or b"{}", object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):
        raise KmsApiError("SerializationException", "The request body is not valid JSON.") from None
    if not isinstance(doc, dict):
        raise KmsApiError("SerializationException", "The request body must be a JSON object.")
    if not _depth_ok(doc):
        raise KmsApiError("SerializationException", "The request body is nested too deeply.")
    return operation, validate(operation, doc)
