"""Names vulture cannot see used: called by a framework or the language, not by our code.

``tests/test_architecture.py`` runs vulture over the package, the tests and the benchmarks with
this file, so anything else defined and never used fails the suite (issue 11: dead code).
"""

# PEP 562 lazy re-exports of prestaged/__init__.py
__getattr__
__dir__
# httptools calls these on the fast path's protocol; asyncio calls data_received.
data_received
on_status
on_header
on_headers_complete
on_body
on_message_complete
# urllib's HTTPRedirectHandler calls it (the daemon client follows no redirect).
redirect_request
# asyncio calls these on the campaign commands' SubprocessProtocol.
pipe_data_received
pipe_connection_lost
process_exited
# Tape REST localities the server may answer (read by value, never named in our code).
NONE
# Submission rows: stored columns, shown through dataclasses.asdict.
created
updated
# aiohttp.web.Response keyword set on test emulators' answers.
content_type
# __exit__ parameters of the emulators' context managers.
exc_type
tb
# mypy-only proof that Metrics satisfies warm.Probe (under TYPE_CHECKING).
_is_probe
# logging.LogRecord fields a filter rewrites (read by logging's formatter).
msg
exc_text
