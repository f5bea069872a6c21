"""``prestaged serve``: daemon lifecycle, HTTP API, watches, campaigns, sd_notify, API client."""
