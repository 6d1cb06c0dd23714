"""Files at the bottom of the package: atomic writes and safe loads (`atomic`), resumable
verified downloads (`download`), safe archive extraction (`archives`). Imports no other part
of msl_kit."""
