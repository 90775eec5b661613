"""Network out: talking to the archive (PACS) with DIMSE and DICOMweb; a real Orthanc launcher."""
