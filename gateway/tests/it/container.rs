//! The container files, checked without Docker (which CI does not have): the compose file
//! parses, every file it names exists, the config it mounts validates, and the Dockerfile builds
//! in two stages and runs as a non-root user with data_dir as a volume.

use std::path::{Path, PathBuf};

fn docker_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("docker")
}

#[test]
fn compose_file_parses_and_names_only_files_that_exist() {
    let dir = docker_dir();
    let compose: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("compose.yaml")).unwrap()).unwrap();
    let services = compose["services"].as_mapping().expect("services");
    for name in ["sitegate", "aws", "fleet", "init", "aws-init"] {
        assert!(services.contains_key(name), "service {name} missing");
    }
    let mut checked = 0;
    for (name, service) in services {
        let name = name.as_str().unwrap();
        if let Some(build) = service.get("build") {
            let context = dir.join(build["context"].as_str().unwrap());
            assert!(
                context.join("Cargo.toml").exists(),
                "{name}: build context {} is not the workspace",
                context.display()
            );
            assert!(
                context.join(build["dockerfile"].as_str().unwrap()).exists(),
                "{name}: dockerfile missing"
            );
            checked += 1;
        }
        for volume in service
            .get("volumes")
            .and_then(|v| v.as_sequence())
            .into_iter()
            .flatten()
        {
            let spec = volume.as_str().unwrap();
            let source = spec.split(':').next().unwrap();
            if source.starts_with("./") || source.starts_with("../") {
                assert!(dir.join(source).exists(), "{name}: {source} does not exist");
                checked += 1;
            } else {
                assert!(
                    compose["volumes"].get(source).is_some(),
                    "{name}: named volume {source} is not declared"
                );
            }
        }
        // Scripts the services run from the mounted ./scripts folder.
        for arg in service
            .get("entrypoint")
            .and_then(|e| e.as_sequence())
            .into_iter()
            .flatten()
        {
            if let Some(script) = arg.as_str().and_then(|a| a.strip_prefix("/scripts/")) {
                assert!(
                    dir.join("scripts").join(script).exists(),
                    "{name}: script {script} missing"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 8, "only {checked} paths checked");
}

/// The fleet is `sitegate simulate`, approving its devices into a group whose selection rule
/// matches the names the simulator gives them.
#[test]
fn the_fleet_is_the_simulator_and_its_devices_fall_in_the_approved_group() {
    let script = std::fs::read_to_string(docker_dir().join("scripts/fleet.sh")).unwrap();
    assert!(script.contains("sitegate simulate"), "{script}");
    let group = script
        .split("--approve-as ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("--approve-as GROUP in fleet.sh");
    let config = sitegate::config::Config::load(&docker_dir().join("sitegate.toml")).unwrap();
    let policies = sitegate::auth::PolicySet::compile(&config.auth).unwrap();
    assert!(
        policies.has_group(group),
        "group {group} not in docker/sitegate.toml"
    );
    use sitegate::fleet::simulate::{device_names, Profile};
    for thing in device_names("sim", Profile::Mixed, 3) {
        assert!(
            policies
                .groups_matching(&sitegate::auth::Facts::named(&thing))
                .iter()
                .any(|g| g == group),
            "{thing} is not selected by group {group}"
        );
    }
}

#[test]
fn the_mounted_config_validates() {
    let config = sitegate::config::Config::load(&docker_dir().join("sitegate.toml")).unwrap();
    assert!(config.sinks.contains_key("telemetry"));
    assert_eq!(
        config.spool.encryption.kms_key_id.as_deref(),
        Some("alias/sitegate")
    );
}

#[test]
fn the_image_is_multi_stage_non_root_with_a_data_volume() {
    let dockerfile = std::fs::read_to_string(docker_dir().join("Dockerfile")).unwrap();
    assert_eq!(
        dockerfile
            .lines()
            .filter(|l| l.starts_with("FROM "))
            .count(),
        2
    );
    assert!(dockerfile.contains("cargo build --release"));
    let user = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert_ne!(user.trim(), "root");
    assert!(dockerfile.contains("VOLUME [\"/var/lib/sitegate\"]"));
}
