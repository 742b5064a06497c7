"""talkgate: an asyncio gateway for live customer conversation (chat, voice, video, bots)."""

__version__ = "0.1.0"
