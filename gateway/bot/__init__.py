"""Speech bots: the gateway dials a bot per conversation over a websocket."""
