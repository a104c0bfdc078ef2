"""dicom_io"""
