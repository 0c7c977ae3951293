//! `[auth.registry] type = "iot"`: the AWS IoT registry, as `moto_server` plays it, vouching
//! for devices that connect with mosquitto clients.

use std::time::Duration;

use aws_sdk_iot::types::{AttributePayload, CertificateStatus};
use sitegate::auth::{DeviceState, RegistryConfig};
use sitegate::identity::pki::IssuedDevice;
use sitegate::ops::admin::{AdminRequest, AdminResponse, DeviceView};
use sitegate_plugins::units::Period;
use tokio::io::AsyncWriteExt;

use crate::common::aws::{Moto, Relay};
use crate::common::*;

/// Freezers may publish their telemetry, and their zone's topic (from the thing's `zone`
/// attribute); pumps only their status. A monitor watches everything.
const REGISTRY_AUTH: &str = r#"
[device_groups.freezers]
selection_rule = "thingGroup: freezers"
policy = "freezer"

[device_groups.pumps]
selection_rule = "thingGroup: pumps OR thingType: pump OR thingName: pump-9"
policy = "pump"

[device_groups.monitors]
selection_rule = "thingName: monitor-*"
policy = "monitor"

[policies.freezer.all]
operations = ["mqtt:connect", "mqtt:publish"]
resources = ["mqtt:clientId:${iot:Connection.Thing.ThingName}", "mqtt:topic:dt/${iot:Connection.Thing.ThingName}/#", "mqtt:topic:zone/${iot:Connection.Thing.Attributes[zone]}/${iot:Connection.Thing.ThingName}"]

[policies.pump.all]
operations = ["mqtt:connect", "mqtt:publish"]
resources = ["mqtt:clientId:${iot:Connection.Thing.ThingName}", "mqtt:topic:status/${iot:Connection.Thing.ThingName}"]

[policies.monitor.all]
operations = ["mqtt:connect", "mqtt:subscribe"]
resources = ["mqtt:clientId:${iot:Connection.Thing.ThingName}", "mqtt:topicfilter:#"]
"#;

/// Registers `device`'s certificate in the emulator with `status`, attached to `attach_to`
/// (if any); returns its ARN.
async fn register(
    iot: &aws_sdk_iot::Client,
    device: &IssuedDevice,
    status: CertificateStatus,
    attach_to: Option<&str>,
) -> String {
    let pem = std::fs::read_to_string(&device.cert).unwrap();
    let out = iot
        .register_certificate_without_ca()
        .certificate_pem(pem)
        .status(status)
        .send()
        .await
        .unwrap();
    // AWS IoT names a certificate as the gateway does: the SHA-256 of its DER.
    assert_eq!(out.certificate_id(), Some(device.cert_id.as_str()));
    let arn = out.certificate_arn().unwrap().to_string();
    if let Some(thing) = attach_to {
        iot.attach_thing_principal()
            .thing_name(thing)
            .principal(&arn)
            .send()
            .await
            .unwrap();
    }
    arn
}

async fn create_thing(iot: &aws_sdk_iot::Client, thing: &str, zone: &str, groups: &[&str]) {
    iot.create_thing()
        .thing_name(thing)
        .attribute_payload(AttributePayload::builder().attributes("zone", zone).build())
        .send()
        .await
        .unwrap();
    for g in groups {
        iot.add_thing_to_thing_group()
            .thing_group_name(*g)
            .thing_name(thing)
            .send()
            .await
            .unwrap();
    }
}

/// A gateway with `REGISTRY_AUTH` and the AWS IoT registry at `endpoint`.
async fn site_with_registry(endpoint: String, sync_interval: Period, trust_for: Period) -> Site {
    Site::start_with(|c| {
        c.auth = toml::from_str(REGISTRY_AUTH).unwrap();
        c.auth.registry = Some(RegistryConfig {
            kind: "iot".into(),
            endpoint: Some(endpoint),
            region: Some("us-east-1".into()),
            sync_interval,
            trust_for,
        });
    })
    .await
}

/// Publishes as `device` until a publish is accepted (at most 10 s): true if one was.
async fn publishes_within(site: &Site, device: &IssuedDevice, topic: &str) -> bool {
    for _ in 0..40 {
        if site
            .publish(device, topic, "try", 1, true)
            .await
            .status
            .success()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

async fn device_view(site: &Site, thing: &str) -> DeviceView {
    match site.admin(AdminRequest::List).await {
        AdminResponse::Devices { devices } => {
            devices.into_iter().find(|d| d.thing == thing).unwrap()
        }
        other => panic!("{other:?}"),
    }
}

async fn sync(site: &Site) -> (usize, usize) {
    match site.admin(AdminRequest::Sync).await {
        AdminResponse::Synced { report } => (report.checked, report.changed),
        other => panic!("{other:?}"),
    }
}

/// Publishes `line` through `stdin` until the monitor prints it, or gives up after `tries`.
async fn seen_by_monitor(
    site: &Site,
    monitor: &IssuedDevice,
    filter: &str,
    stdin: &mut tokio::process::ChildStdin,
    line: &str,
    tries: usize,
) -> bool {
    let sub = site.subscribe(monitor, filter, true, &["-C", "1", "-W", "8"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut sub = sub;
    for _ in 0..tries {
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        if tokio::time::timeout(Duration::from_millis(250), sub.wait())
            .await
            .is_ok()
        {
            break;
        }
    }
    collect(sub, Duration::from_secs(10)).await.contains(line)
}

/// A device registered in AWS IoT is approved into the group its thing group selects with no
/// operator step, and its attribute fills the policy variable; moving it to another thing group
/// changes what its live connection may publish; revoking its certificate in the registry cuts
/// the connection off; a certificate attached to no thing of its name stays pending, with the
/// reason in `device list`.
#[tokio::test(flavor = "multi_thread")]
async fn the_aws_iot_registry_vouches_for_devices_on_live_connections() {
    let moto = Moto::start_with_der_certificate_ids().await;
    let iot = moto.iot(&moto.endpoint).await;
    for g in ["freezers", "pumps"] {
        iot.create_thing_group()
            .thing_group_name(g)
            .send()
            .await
            .unwrap();
    }
    // Syncs here are asked for with `device sync`.
    let hour = Period::from_secs(3600);
    let site = site_with_registry(moto.endpoint.clone(), hour, hour).await;
    let monitor = site.device("monitor-1").await;

    let freezer = site.issue("freezer-1");
    create_thing(&iot, "freezer-1", "b", &["freezers"]).await;
    let arn = register(&iot, &freezer, CertificateStatus::Active, Some("freezer-1")).await;

    // No operator step: its first connection is pending, then approved by the registry.
    let (mut publisher, mut stdin) = site.line_publisher(&freezer, "dt/freezer-1/temp");
    assert!(
        seen_by_monitor(
            &site,
            &monitor,
            "dt/freezer-1/#",
            &mut stdin,
            "approved-by-registry",
            40
        )
        .await,
        "the registered device was never approved"
    );
    let view = device_view(&site, "freezer-1").await;
    assert_eq!(view.state, DeviceState::Approved);
    assert_eq!(view.groups, vec!["freezers"]);
    assert_eq!(view.certs[0].voucher, sitegate::auth::Voucher::Registry);
    // The thing's `zone` attribute fills the policy variable: its zone's topic, not another's.
    let out = site
        .publish(&freezer, "zone/b/freezer-1", "in-zone", 1, true)
        .await;
    assert!(out.status.success(), "{}", text(&out));
    let out = site
        .publish(&freezer, "zone/c/freezer-1", "other-zone", 1, true)
        .await;
    assert!(text(&out).contains("Not authorized"), "{}", text(&out));
    let accepted = site.snapshot().connections_accepted;

    // Moved to the pumps thing group in the cloud: after a sync its live connection may no
    // longer publish telemetry.
    iot.remove_thing_from_thing_group()
        .thing_group_name("freezers")
        .thing_name("freezer-1")
        .send()
        .await
        .unwrap();
    iot.add_thing_to_thing_group()
        .thing_group_name("pumps")
        .thing_name("freezer-1")
        .send()
        .await
        .unwrap();
    let (checked, changed) = sync(&site).await;
    assert!(
        checked >= 2 && changed == 1,
        "checked {checked}, changed {changed}"
    );
    assert_eq!(device_view(&site, "freezer-1").await.groups, vec!["pumps"]);
    assert!(
        !seen_by_monitor(
            &site,
            &monitor,
            "dt/freezer-1/#",
            &mut stdin,
            "after-move",
            3
        )
        .await,
        "telemetry got through after the move"
    );
    // One new connection: the monitor's; the freezer's publisher kept its own.
    assert_eq!(
        site.snapshot().connections_accepted,
        accepted + 1,
        "the grant changed without a reconnect"
    );
    drop(stdin);
    let _ = publisher.wait().await;

    // Revoked in the registry: its live connection is cut off at the next sync.
    let (mut idle, idle_stdin) = site.line_publisher(&freezer, "status/freezer-1");
    site.wait_for("the freezer to connect again", |s| s.connections_open == 1)
        .await;
    let cert_id = arn.rsplit('/').next().unwrap().to_string();
    iot.update_certificate()
        .certificate_id(&cert_id)
        .new_status(CertificateStatus::Revoked)
        .send()
        .await
        .unwrap();
    sync(&site).await;
    site.wait_for("the revoked certificate's connection to be cut off", |s| {
        s.connections_open == 0 && s.revoked_disconnects == 1
    })
    .await;
    drop(idle_stdin);
    let _ = idle.wait().await;
    let cert = &device_view(&site, "freezer-1").await.certs[0];
    assert_eq!(cert.state, DeviceState::Revoked);
    assert_eq!(cert.reason.as_deref(), Some("REVOKED in AWS IoT"));

    // Registered and ACTIVE, but attached to no thing named by its CN: pending, and why.
    let kiosk = site.issue("kiosk-1");
    create_thing(&iot, "kiosk-1", "a", &["pumps"]).await;
    register(&iot, &kiosk, CertificateStatus::Active, None).await;
    let out = site.publish(&kiosk, "status/kiosk-1", "x", 1, true).await;
    assert!(text(&out).contains("Not authorized"), "{}", text(&out));
    sync(&site).await;
    let view = device_view(&site, "kiosk-1").await;
    assert_eq!(view.state, DeviceState::Pending);
    assert_eq!(
        view.certs[0].reason.as_deref(),
        Some("not attached to thing kiosk-1 in AWS IoT")
    );
    site.stop().await;
}

/// Registry unreachable: what it said last stands for `trust_for`, then a device only it
/// approved is pending again (it falls back to what the local registry says); one an operator
/// approved keeps working.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_registry_is_trusted_for_a_while_then_the_local_registry_decides() {
    let moto = Moto::start_with_der_certificate_ids().await;
    let relay = Relay::start(&moto.endpoint).await;
    let iot = moto.iot(&moto.endpoint).await;
    iot.create_thing_type()
        .thing_type_name("pump")
        .send()
        .await
        .unwrap();
    let site =
        site_with_registry(relay.endpoint(), Period::from_secs(1), Period::from_secs(6)).await;
    let pump = site.issue("pump-7");
    iot.create_thing()
        .thing_name("pump-7")
        .thing_type_name("pump")
        .send()
        .await
        .unwrap();
    register(&iot, &pump, CertificateStatus::Active, Some("pump-7")).await;
    // Approved by the registry (thingType: pump selects the pumps group).
    assert!(
        publishes_within(&site, &pump, "status/pump-7").await,
        "the registry never approved pump-7"
    );
    // An operator-approved device beside it, unknown to the cloud.
    let local = site.device("pump-9").await;

    relay.set(false);
    // Within the trust: still approved.
    let out = site
        .publish(&pump, "status/pump-7", "trusted", 1, true)
        .await;
    assert!(out.status.success(), "{}", text(&out));
    // Past it: pending, as the local registry (no operator approval) says.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let out = site.publish(&pump, "status/pump-7", "stale", 1, true).await;
    assert!(text(&out).contains("Not authorized"), "{}", text(&out));
    let out = site
        .publish(&local, "status/pump-9", "local", 1, true)
        .await;
    assert!(out.status.success(), "{}", text(&out));
    // Back: approved again at the next sync.
    relay.set(true);
    assert!(
        publishes_within(&site, &pump, "status/pump-7").await,
        "pump-7 was not approved again once the registry answered"
    );
    site.stop().await;
}

/// In-band enrollment vouched for by AWS IoT: the factory recorded the device's key digest in
/// its thing's `sitegate_enrollment_key` attribute, so the claim device's request is answered
/// with no operator step (and the certificate gets the thing group's policy). A thing whose
/// attribute does not name the requesting key stays pending, with the reason in `device list`:
/// a stolen claim certificate vouches for nothing.
#[tokio::test(flavor = "multi_thread")]
async fn the_aws_iot_registry_vouches_for_an_enrollment_whose_key_the_factory_recorded() {
    use crate::edge::enroll::{
        answer_of, claim_cert, claim_request, device_csr, enable_enrollment,
    };
    use sha2::Digest as _;
    let moto = Moto::start_with_der_certificate_ids().await;
    let iot = moto.iot(&moto.endpoint).await;
    iot.create_thing_group()
        .thing_group_name("pumps")
        .send()
        .await
        .unwrap();
    let mut claim_ca = std::path::PathBuf::new();
    let hour = Period::from_secs(3600);
    let endpoint = moto.endpoint.clone();
    let site = Site::start_with(|c| {
        c.auth = toml::from_str(REGISTRY_AUTH).unwrap();
        c.auth.registry = Some(RegistryConfig {
            kind: "iot".into(),
            endpoint: Some(endpoint),
            region: Some("us-east-1".into()),
            sync_interval: hour,
            trust_for: hour,
        });
        claim_ca = enable_enrollment(c, 10, 4);
    })
    .await;
    let claim = claim_cert(&site, &claim_ca);
    let on_device = site.dir.path().join("on-device");
    std::fs::create_dir_all(&on_device).unwrap();

    // At the factory: the key, and its digest recorded on the thing (README's openssl line).
    let (key, csr) = device_csr(&on_device, "pump-21", "pump-21");
    let public = on_device.join("pump-21.pub.der");
    let out = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&public)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let digest = hex::encode(sha2::Sha256::digest(std::fs::read(&public).unwrap()));
    iot.create_thing()
        .thing_name("pump-21")
        .attribute_payload(
            AttributePayload::builder()
                .attributes("sitegate_enrollment_key", &digest)
                .build(),
        )
        .send()
        .await
        .unwrap();
    iot.add_thing_to_thing_group()
        .thing_group_name("pumps")
        .thing_name("pump-21")
        .send()
        .await
        .unwrap();
    let answer = answer_of(claim_request(
        &site,
        &claim,
        "claim-1",
        "$sitegate/enroll/pump-21",
        "$sitegate/enroll/pump-21/accepted",
        &csr,
        20,
    ))
    .await;
    let cert_id = answer["certificateId"].as_str().unwrap().to_string();
    let cert = on_device.join("pump-21.pem");
    std::fs::write(&cert, answer["certificatePem"].as_str().unwrap()).unwrap();
    let pump = IssuedDevice {
        thing: "pump-21".into(),
        cert_id: cert_id.clone(),
        cert,
        key,
    };
    assert!(publishes_within(&site, &pump, "status/pump-21").await);
    let view = device_view(&site, "pump-21").await;
    assert_eq!(view.state, DeviceState::Approved, "{view:?}");
    assert!(view.groups.contains(&"pumps".to_string()), "{view:?}");

    // The thing exists, but its attribute names another key: pending, and why.
    create_thing(&iot, "pump-22", "a", &["pumps"]).await;
    let (_, other) = device_csr(&on_device, "pump-22", "pump-22");
    let waiting = claim_request(
        &site,
        &claim,
        "claim-1",
        "$sitegate/enroll/pump-22",
        "$sitegate/enroll/pump-22/accepted",
        &other,
        4,
    );
    let out = waiting.wait_with_output().await.unwrap();
    assert!(out.stdout.is_empty(), "{}", text(&out));
    let view = device_view(&site, "pump-22").await;
    let cert = &view.certs[0];
    assert_eq!(cert.state, DeviceState::Pending, "{view:?}");
    assert!(
        cert.reason
            .as_deref()
            .is_some_and(|r| r.contains("sitegate_enrollment_key")),
        "{view:?}"
    );
    // A sync keeps both as they are.
    sync(&site).await;
    assert_eq!(
        device_view(&site, "pump-21").await.state,
        DeviceState::Approved
    );
    assert_eq!(
        device_view(&site, "pump-22").await.certs[0].state,
        DeviceState::Pending
    );
    site.stop().await;
}
