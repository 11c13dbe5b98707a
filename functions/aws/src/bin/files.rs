//! `files` Lambda: GET /v1/files/{key+}, the result URLs tasklane signs
//! ([`tasklane_core::result_urls`]): checks the signature and expiry and answers a `302` to an
//! S3 presigned GET of a few minutes, `403 forbidden` (expired, tampered) or `410 expired`
//! (the object is gone). Its own function, not the status one: it needs only the signing key
//! and `s3:GetObject` on the results, no table or queue access, and loads no model catalog.

use lambda_http::{run, service_fn};
use tasklane_aws::lambda::{handle_files, init_tracing};

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    init_tracing();
    let files = match tasklane_aws::settings::files_from_env().await {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, "invalid configuration");
            eprintln!("tasklane: {e}");
            std::process::exit(2);
        }
    };
    run(service_fn(|req| {
        let files = files.clone();
        async move { handle_files(&files, req).await }
    }))
    .await
}
