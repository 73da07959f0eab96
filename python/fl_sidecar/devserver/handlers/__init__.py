"""The dev server's request handlers, one module per resource of the REST API.

:mod:`.context` holds what every handler shares (the store, the notifier, the
data directories, authentication); :mod:`.users`, :mod:`.models`,
:mod:`.trainings` and :mod:`.metrics` answer their calls; :mod:`.aggregation`
averages a round's local models in the background.
"""
