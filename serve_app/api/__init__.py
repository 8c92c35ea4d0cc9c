"""HTTP: the app (`app`) built from one router per protocol (`native`, `v2`, `management`),
the shared request-body reader (`body`), the V2 codec (`v2_codec`, `v2_tasks`), and a small
client of a running fleet (`client`).
"""
