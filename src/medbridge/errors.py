"""One exception tree for medbridge; each class carries the exit code the CLI returns.

    MedbridgeError                      1  anything medbridge itself refuses or fails at
    ├── InvalidInput                    2  bad arguments, malformed files, unreadable keys
    │   └── NotAnonymised                  a dataset fails the anonymisation profile
    ├── NotInitialised                  3  the platform home has not been created
    │   └── SchemaOutdated                 its control database needs `platform migrate`
    ├── NotFound                        4  unknown user, group, dataset or grant
    ├── AlreadyExists                   5  duplicate names, home already initialised
    ├── AccessDenied                    6  the platform said no
    │   ├── AccountDisabled                the account exists but is disabled
    │   ├── GrantMissing                   no live grant covers the dataset
    │   ├── CertificateRefused             the issuer would not sign
    │   ├── LimitReached                   a configured limit (certificate rate, live certificates)
    │   └── AccessRevoked                  refused: a job's session was refused or ended (PermissionError)
    ├── IntegrityError                  7  audit chain or manifest does not verify
    ├── PlatformUnavailable             8  the platform cannot be reached or served
    │   ├── AddressInUse                   the listen address is taken
    │   ├── HostKeyMismatch                the platform is not the one pinned
    │   ├── AuditUnavailable               the audit cannot record a decision, so it is refused
    │   ├── PlatformUnreachable            cut: unreachable past the loader's patience (ConnectionError)
    │   └── BadReply                       broken: a reply outside the protocol (OSError)
    ├── LoaderClosed                    1  closed: the loader's caller closed it (OSError)
    └── JobFailed                       9  the job wrapper could not set up the job

A payload started by ``medbridge job run`` passes its own exit code through;
signals end it with 128+N.  Codes 1-9 come only from medbridge itself.

The loader's errors are also the built-in ``OSError`` (in brackets) that file-like
callers expect; by type they say what to do: refused is final (never retried),
cut was retried for as long as allowed, closed means the caller stopped it, and
broken means the connection could not be trusted.
"""

from __future__ import annotations


class MedbridgeError(Exception):
    """Base of everything medbridge raises on purpose."""

    exit_code = 1


class InvalidInput(MedbridgeError):
    """The caller gave something medbridge cannot use."""

    exit_code = 2


class NotAnonymised(InvalidInput):
    """Images still carry what the anonymisation profile forbids."""


class NotInitialised(MedbridgeError):
    """The platform home does not exist or is incomplete."""

    exit_code = 3


class SchemaOutdated(NotInitialised):
    """The control database's schema is older (or newer) than this medbridge's."""


class NotFound(MedbridgeError):
    """A named user, group, dataset or grant does not exist."""

    exit_code = 4


class AlreadyExists(MedbridgeError):
    """A name is already taken."""

    exit_code = 5


class AccessDenied(MedbridgeError):
    """The platform refused an action on policy grounds."""

    exit_code = 6


class AccountDisabled(AccessDenied):
    """The account exists but has been disabled."""


class GrantMissing(AccessDenied):
    """No live grant gives the user the dataset."""


class CertificateRefused(AccessDenied):
    """The issuer refused to sign a job certificate."""


class LimitReached(AccessDenied):
    """A limit the operator configured was reached; the message names the setting."""


class AccessRevoked(AccessDenied, PermissionError):
    """The platform refused a job's session, or ended it: revoked, expired, job or grant ended.

    Raised at once and never retried (another login would be refused too); the
    message carries the reason the platform gave.
    """


class IntegrityError(MedbridgeError):
    """Stored data failed verification (audit chain, manifest)."""

    exit_code = 7


class PlatformUnavailable(MedbridgeError):
    """The platform could not be reached, or could not be served."""

    exit_code = 8


class AddressInUse(PlatformUnavailable):
    """The listen address is already bound by another process."""


class HostKeyMismatch(PlatformUnavailable):
    """The platform's host key is not the pinned one: possibly an impostor."""


class AuditUnavailable(PlatformUnavailable):
    """The audit could not record a decision: the request it would have allowed is refused."""


class PlatformUnreachable(PlatformUnavailable, ConnectionError):
    """The link stayed cut longer than the loader's patience; reads were retried until then."""


class BadReply(PlatformUnavailable, OSError):
    """The platform answered outside the protocol (a malformed or mismatched reply): not retried."""


class LoaderClosed(MedbridgeError, OSError):
    """The loader was closed by its caller while a read was pending or about to start."""


class JobFailed(MedbridgeError):
    """The job wrapper could not prepare or run the job."""

    exit_code = 9
