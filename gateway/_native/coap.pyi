"""Type stub of the native CoAP codec (gateway/_native/coap.pyx)."""

from collections.abc import Iterable
from typing import Final, final

from typing_extensions import Buffer

OptionValue = int | str | Buffer
Option = tuple[int, OptionValue]

CON: Final[int]
NON: Final[int]
ACK: Final[int]
RST: Final[int]

EMPTY: Final[int]
GET: Final[int]
POST: Final[int]
PUT: Final[int]
DELETE: Final[int]
FETCH: Final[int]
PATCH: Final[int]
IPATCH: Final[int]
CREATED: Final[int]
DELETED: Final[int]
VALID: Final[int]
CHANGED: Final[int]
CONTENT: Final[int]
CONTINUE: Final[int]
BAD_REQUEST: Final[int]
UNAUTHORIZED: Final[int]
BAD_OPTION: Final[int]
FORBIDDEN: Final[int]
NOT_FOUND: Final[int]
METHOD_NOT_ALLOWED: Final[int]
NOT_ACCEPTABLE: Final[int]
REQUEST_ENTITY_INCOMPLETE: Final[int]
CONFLICT: Final[int]
PRECONDITION_FAILED: Final[int]
REQUEST_ENTITY_TOO_LARGE: Final[int]
UNSUPPORTED_CONTENT_FORMAT: Final[int]
UNPROCESSABLE_ENTITY: Final[int]
TOO_MANY_REQUESTS: Final[int]
INTERNAL_SERVER_ERROR: Final[int]
NOT_IMPLEMENTED: Final[int]
BAD_GATEWAY: Final[int]
SERVICE_UNAVAILABLE: Final[int]
GATEWAY_TIMEOUT: Final[int]
PROXYING_NOT_SUPPORTED: Final[int]

IF_MATCH: Final[int]
URI_HOST: Final[int]
ETAG: Final[int]
IF_NONE_MATCH: Final[int]
OBSERVE: Final[int]
URI_PORT: Final[int]
LOCATION_PATH: Final[int]
URI_PATH: Final[int]
CONTENT_FORMAT: Final[int]
MAX_AGE: Final[int]
URI_QUERY: Final[int]
ACCEPT: Final[int]
LOCATION_QUERY: Final[int]
BLOCK2: Final[int]
BLOCK1: Final[int]
SIZE2: Final[int]
PROXY_URI: Final[int]
PROXY_SCHEME: Final[int]
SIZE1: Final[int]
NO_RESPONSE: Final[int]

TEXT_PLAIN: Final[int]
LINK_FORMAT: Final[int]
XML: Final[int]
OCTET_STREAM: Final[int]
EXI: Final[int]
JSON: Final[int]
JSON_PATCH: Final[int]
MERGE_PATCH: Final[int]
CBOR: Final[int]
SENML_JSON: Final[int]
SENML_CBOR: Final[int]

class CoapError(ValueError): ...

class CoapFormatError(CoapError):
    mid: int | None
    type: int | None
    def __init__(self, message: str, mid: int | None = None, type: int | None = None) -> None: ...

@final
class Message:
    def __init__(
        self,
        type: int,
        code: int,
        mid: int = 0,
        token: Buffer = b"",
        options: Iterable[Option] = (),
        payload: bytes | bytearray | memoryview = b"",
    ) -> None: ...
    @property
    def type(self) -> int: ...
    @property
    def code(self) -> int: ...
    @property
    def mid(self) -> int: ...
    @property
    def token(self) -> bytes: ...
    @property
    def payload(self) -> bytes | bytearray | memoryview: ...
    @property
    def bad_critical(self) -> tuple[int, ...]: ...
    @property
    def is_request(self) -> bool: ...
    @property
    def is_response(self) -> bool: ...
    @property
    def is_empty(self) -> bool: ...
    @property
    def uri_host(self) -> str | None: ...
    @property
    def uri_port(self) -> int | None: ...
    @property
    def uri_path(self) -> list[str]: ...
    @property
    def uri_query(self) -> list[str]: ...
    @property
    def path(self) -> str: ...
    @property
    def location_path(self) -> list[str]: ...
    @property
    def location_query(self) -> list[str]: ...
    @property
    def content_format(self) -> int | None: ...
    @property
    def accept(self) -> int | None: ...
    @property
    def max_age(self) -> int | None: ...
    @property
    def observe(self) -> int | None: ...
    @property
    def etag(self) -> bytes | None: ...
    @property
    def etags(self) -> list[bytes]: ...
    @property
    def if_match(self) -> list[bytes]: ...
    @property
    def if_none_match(self) -> bool: ...
    @property
    def block1(self) -> tuple[int, bool, int] | None: ...
    @property
    def block2(self) -> tuple[int, bool, int] | None: ...
    @property
    def size1(self) -> int | None: ...
    @property
    def size2(self) -> int | None: ...
    @property
    def proxy_uri(self) -> str | None: ...
    @property
    def proxy_scheme(self) -> str | None: ...
    @property
    def no_response(self) -> int | None: ...
    @property
    def options(self) -> list[tuple[int, bytes]]: ...
    def get_options(self, number: int) -> list[bytes]: ...
    def encode(self) -> bytes: ...

def decode(data: Buffer) -> Message: ...
def encode(
    type: int,
    code: int,
    mid: int,
    token: Buffer = b"",
    options: Iterable[Option] = (),
    payload: Buffer = b"",
) -> bytes: ...
def encode_request(
    type: int,
    code: int,
    mid: int,
    token: Buffer,
    path: str,
    options: Iterable[Option] = (),
    payload: Buffer = b"",
) -> bytes: ...
def encode_empty(type: int, mid: int) -> bytes: ...
def code_str(code: int) -> str: ...
def block_value(num: int, more: bool, szx: int) -> int: ...
def block_size(szx: int) -> int: ...
