"""The platform side: keys, the job-certificate issuer and the SFTP data plane."""
