"""Storage access: the touch over HTTP(S) (``http``), its keep-alive fast path for plain ranged
GETs (``fast``) and what a touch gives (``attempt``); dCache locality and staging come later."""
