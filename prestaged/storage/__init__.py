"""Storage access: the touch over HTTP(S) (``http``); dCache locality and staging come later."""
