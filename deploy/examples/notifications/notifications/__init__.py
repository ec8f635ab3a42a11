"""The notifications app: per-user notifications and chat rooms over Channels."""
