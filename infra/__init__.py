"""The lowest layer: SQL helpers, the broker transport, the channel layer and the database
backend. Django and libraries only; nothing here imports an app of this project.

It is a top-level package rather than part of an app because every app sits above it: the
audit app (the lowest one) writes through its SQL helpers, and the console (the highest) names
its backend and transports in settings. Inside any one app, the apps below that one would have
to import upward to reach it.
"""
