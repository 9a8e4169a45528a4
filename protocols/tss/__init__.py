"""116117 Terminservice (TVS Terminsynchronisation): FHIR R4 XML, profiles, sync cursor.

Pure: no I/O. ``xml`` (FHIR XML <-> dicts), ``resources`` (profiles, builders, checks),
``sync`` (cursor, local store, applying changes), ``messages`` (entity messages).
"""
