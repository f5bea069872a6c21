"""The campaign queue: campaign files, their submit/complete commands, their SQL, the runner."""
