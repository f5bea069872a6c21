"""Storage access: the touch over HTTP(S) (``http``), its keep-alive fast path for plain ranged
GETs (``fast``) and the HTTP details both share (``attempt``); what a touch gives is
``model.Attempt``. dCache locality and staging (the Tape REST API) come with issue 13."""
