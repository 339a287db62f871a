"""HTTP routes, split by area: pages and the conversation list (pages.py), sending and
streaming messages (chat.py). Shared rendering helpers live in views.py."""
