"""The campaign queue, one concern per module: ``spec`` (the campaign file), ``commands``
(running submit/complete commands), ``repository`` (its rows in the state database), ``runner``
(the state machine) and ``actions`` (operator actions shared by the CLI and the daemon).

Nothing is imported here, so that ``campaign list``/``show`` load the repository without the
runner's storage stack."""
