"""The header keywords each fact is read from by default (:mod:`reduction.frames` reads them).

Why a module of its own: the observer config's defaults come from these lists, and importing
them from :mod:`reduction.frames` would load astropy's FITS, WCS, time and coordinates (~0.25 s)
for every command, ``observer --help`` included.
"""

from __future__ import annotations

#: Header keywords per fact, tried in order: the dialects of acquisition programs (MaxIm DL, N.I.N.A.,
#: SBIG) and observatory systems (NOAO/IRAF, ESO HIERARCH, Calar Alto, NOT).  An entry with ``*`` is a
#: pattern over the header's keys (HIERARCH cards are keyed without the word HIERARCH).  The
#: observer config's ``header`` section defaults to these lists and may replace them.
DEFAULT_KEYWORDS: dict[str, tuple[str, ...]] = {
    "filter": ("FILTER", "FILTER1", "FILTER2", "FILTNAME", "FILTNAM", "FILT", "INSFLNAM", "INSFILTE",
               "ALFLTNM", "FILTERS", "* FILT* NAME"),
    "kind": ("IMAGETYP", "FRAMETYP", "FRAME", "IMGTYPE", "OBSTYPE"),
    "exposure": ("EXPTIME", "EXPOSURE", "EXP_TIME", "ITIME"),
    "gain": ("GAIN", "EGAIN", "CCDGAIN"),
    "read_noise": ("RDNOISE", "READNOIS", "RDNOIS", "RON", "CCDRON", "READNOISE"),
    "date": ("DATE-OBS", "DATE_OBS", "MJD-OBS", "MJD_OBS", "JD", "JD-OBS"),
    "target": ("OBJECT", "OBJNAME", "FIELD"),
}
